//! Terms, votes and role changes.

use super::{Replica, ReplicaError};
use crate::layout::SlotKind;
use crate::record::{VoteRequest, VoteResponse};
use crate::store::LogStore;
use crate::types::{NodeId, Role, Term};

impl<S: LogStore> Replica<S> {
    /// Becomes a candidate of the next term.
    pub(super) fn start_election(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.recovery.is_none());
        self.counters.elections += 1;
        self.leave_leadership();
        self.term += 1;
        self.voted_for = Some(self.cfg.id);
        self.save_hard_state()?;
        self.role = super::Role::Candidate;
        self.leader = None;
        self.votes = 1 << self.cfg.id.0;
        // Revoke the old leader's grant; the request goes out once what it
        // landed has been drained, so it states our real last entry.
        self.set_writer(None);
        self.vote_requests_pending = true;
        self.reset_election_timer();
        if self.majority == 1 {
            self.become_leader()?;
        } else if !self.settling {
            self.send_vote_requests();
        }
        Ok(())
    }

    fn send_vote_requests(&mut self) {
        self.vote_requests_pending = false;
        for p in self.peers() {
            self.send_record(SlotKind::VoteRequest, p);
        }
    }

    /// Moves to a higher term, as a follower of `leader` if it is known.
    pub(super) fn adopt_term(
        &mut self,
        term: Term,
        leader: Option<NodeId>,
    ) -> Result<(), ReplicaError> {
        assert!(term > self.term, "terms only grow");
        self.leave_leadership();
        self.term = term;
        self.voted_for = None;
        self.save_hard_state()?;
        self.role = Role::Follower;
        self.leader = leader;
        self.vote_requests_pending = false;
        self.set_writer(leader);
        // Hearing a higher term from a candidate is no sign of a live leader:
        // resetting here would let a candidate that cannot win (stale log)
        // keep everyone else from ever timing out.
        if leader.is_some() {
            self.reset_election_timer();
        }
        Ok(())
    }

    /// Follows the leader of the current term (we were its rival candidate).
    pub(super) fn become_follower(&mut self, leader: Option<NodeId>) {
        self.leave_leadership();
        self.role = Role::Follower;
        self.leader = leader;
        self.vote_requests_pending = false;
        self.set_writer(leader);
        self.reset_election_timer();
    }

    /// A leader cut off from its majority stops leading (same term).
    pub(super) fn step_down(&mut self) {
        self.become_follower(None);
    }

    fn leave_leadership(&mut self) {
        if self.lead.take().is_some() {
            // Whatever is in flight completes into nothing.
            self.outbox.reset_kind(SlotKind::Leader);
            self.status_dirty = true;
        }
    }

    /// Answers vote requests.
    pub(super) fn read_vote_requests(&mut self) -> Result<(), ReplicaError> {
        for p in self.peers() {
            let Some(req) = self.read_slot::<VoteRequest>(SlotKind::VoteRequest, p) else {
                continue;
            };
            if req.term < self.term || self.answered_vote[p.index()] >= req.term {
                continue;
            }
            if req.term > self.term && self.leader_is_alive() {
                // Leader stickiness (Raft thesis 9.6): while our leader is
                // alive, a node that cannot hear it must not depose it.
                continue;
            }
            if req.term > self.term {
                self.adopt_term(req.term, None)?;
            }
            if self.settling {
                // Decide once the old leader's landed entries are in our log.
                continue;
            }
            let up_to_date = (req.last_term, req.last_index) >= (self.last_term, self.last_index);
            let free = self.voted_for.is_none() || self.voted_for == Some(p);
            let grant =
                free && up_to_date && self.recovery.is_none() && self.role == Role::Follower;
            if grant && self.voted_for.is_none() {
                self.voted_for = Some(p);
                self.save_hard_state()?;
                self.reset_election_timer();
            }
            self.answered_vote[p.index()] = req.term;
            self.send_record(SlotKind::VoteResponse, p);
        }
        Ok(())
    }

    /// Counts votes.
    pub(super) fn read_vote_responses(&mut self) -> Result<(), ReplicaError> {
        if self.vote_requests_pending && !self.settling {
            self.send_vote_requests();
        }
        for p in self.peers() {
            let Some(resp) = self.read_slot::<VoteResponse>(SlotKind::VoteResponse, p) else {
                continue;
            };
            if resp.term > self.term {
                return self.adopt_term(resp.term, None);
            }
            if resp.term == self.term && resp.granted {
                self.votes |= 1 << p.0;
            }
        }
        if self.role == Role::Candidate && self.votes.count_ones() as usize >= self.majority {
            self.become_leader()?;
        }
        Ok(())
    }

    /// Whether we heard from a live leader of our term within the minimum
    /// election timeout (a leader: whether it still has its quorum).
    pub(super) fn leader_is_alive(&self) -> bool {
        match self.role {
            Role::Leader => true,
            Role::Candidate => false,
            Role::Follower => {
                self.leader.is_some() && self.now < self.leader_contact + self.cfg.election_timeout
            }
        }
    }

    pub(super) fn render_vote_request(&self) -> VoteRequest {
        VoteRequest {
            term: self.term,
            last_index: self.last_index,
            last_term: self.last_term,
        }
    }

    pub(super) fn render_vote_response(&self, candidate: NodeId) -> VoteResponse {
        VoteResponse {
            term: self.term,
            granted: self.voted_for == Some(candidate),
        }
    }
}
