//! Terms, votes and role changes.
//!
//! A node whose election timer fires first runs a pre-vote (Raft thesis
//! 9.6): it asks every peer whether it would get its vote in the next
//! term, and stands (raises its term, revokes the old leader's grant,
//! asks for real votes) only once a majority says yes. Nobody's term or
//! vote changes on a pre-vote, and a voter that still hears its leader
//! does not answer. So a node that was cut off, paused or starved of CPU
//! comes back without deposing a leader the others still follow: its term
//! never rose, and the leader adopts only higher terms.

use super::{Replica, ReplicaError};
use crate::layout::SlotKind;
use crate::record::{VoteRequest, VoteResponse};
use crate::store::LogStore;
use crate::types::{NodeId, Role, Term};

/// A pre-vote in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PreVote {
    /// The term we would stand in: our term + 1.
    term: Term,
    /// Who said yes, ourselves included (bit per node).
    granted: u32,
    /// Who said they lost their log and may not vote (bit per node).
    recovering: u32,
}

impl<S: LogStore> Replica<S> {
    /// Our election timer fired: asks whether a majority would vote for us
    /// in the next term before raising ours. A new round starts each time
    /// the timer fires again, until a leader is heard or a majority agrees.
    pub(super) fn start_pre_vote(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.recovery.is_none());
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::NoPreVote) {
            return self.start_election();
        }
        if self.majority == 1 {
            return self.start_election();
        }
        self.counters.pre_votes += 1;
        self.pre_vote = Some(PreVote {
            term: self.term + 1,
            granted: 1 << self.cfg.id.0,
            recovering: 0,
        });
        self.reset_election_timer();
        for p in self.peers() {
            self.send_record(SlotKind::VoteRequest, p);
        }
        Ok(())
    }

    /// Becomes a candidate of the next term.
    pub(super) fn start_election(&mut self) -> Result<(), ReplicaError> {
        debug_assert!(self.recovery.is_none());
        debug_assert!(self.pre_vote.is_none_or(|pv| pv.term == self.term + 1));
        self.counters.elections += 1;
        self.pre_vote = None;
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
        } else if !self.settling || self.drain_skipped() {
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
        self.pre_vote = None;
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
        self.pre_vote = None;
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
            if req.pre {
                self.answer_pre_vote(p, &req);
                continue;
            }
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
            if self.settling && !self.drain_skipped() {
                // Decide once the old leader's landed entries are in our log.
                continue;
            }
            let up_to_date = self.candidate_is_up_to_date(&req);
            let free = self.voted_for.is_none() || self.voted_for == Some(p);
            let grant = free && up_to_date && self.may_vote() && self.role == Role::Follower;
            if grant && self.voted_for.is_none() {
                self.voted_for = Some(p);
                self.save_hard_state()?;
                self.reset_election_timer();
            }
            self.answered_vote[p.index()] = req.term;
            self.pre_vote_answer[p.index()] = None;
            self.send_record(SlotKind::VoteResponse, p);
        }
        Ok(())
    }

    /// Whether we may grant votes: not while recovering what a restart lost
    /// (our log may lack entries we acknowledged).
    fn may_vote(&self) -> bool {
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::NoRecoveringGate) {
            return true;
        }
        !self.is_recovering()
    }

    /// The planted bug that votes before the old writer's landed entries
    /// are drained (always `false` in a real build).
    fn drain_skipped(&self) -> bool {
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::NoDrainBeforeVote) {
            return true;
        }
        false
    }

    /// Whether a candidate's log (as its request states it) is at least as
    /// up to date as ours.
    fn candidate_is_up_to_date(&self, req: &VoteRequest) -> bool {
        (req.last_term, req.last_index) >= (self.last_term, self.last_index)
    }

    /// Answers a pre-vote: would we vote for `p` in `req.term`? Only read
    /// while we hear no live leader. Nothing of ours changes; the answer
    /// is sent again whenever it changes (a recovering voter that has
    /// recovered, a log that fell behind), since a candidate repeats a
    /// pre-vote without raising its term. A yes carries the term asked
    /// about, a no our own: a candidate behind our term adopts it (else
    /// one with the longest log but an old term could never stand).
    fn answer_pre_vote(&mut self, p: NodeId, req: &VoteRequest) {
        debug_assert!(req.pre);
        if self.settling && !self.drain_skipped() {
            // Decide once our tail is final.
            return;
        }
        let granted = req.term > self.term && self.candidate_is_up_to_date(req) && self.may_vote();
        let answer = VoteResponse {
            term: if granted { req.term } else { self.term },
            granted,
            pre: true,
            recovering: self.is_recovering(),
        };
        if self.pre_vote_answer[p.index()] != Some(answer) {
            self.pre_vote_answer[p.index()] = Some(answer);
            self.send_record(SlotKind::VoteResponse, p);
        }
    }

    /// Counts votes.
    pub(super) fn read_vote_responses(&mut self) -> Result<(), ReplicaError> {
        if self.vote_requests_pending && (!self.settling || self.drain_skipped()) {
            self.send_vote_requests();
        }
        for p in self.peers() {
            let Some(resp) = self.read_slot::<VoteResponse>(SlotKind::VoteResponse, p) else {
                continue;
            };
            if resp.pre {
                if !resp.granted && resp.term > self.term {
                    return self.adopt_term(resp.term, None);
                }
                if let Some(pv) = &mut self.pre_vote {
                    if resp.term == pv.term && resp.granted {
                        pv.granted |= 1 << p.0;
                    }
                    if resp.recovering {
                        pv.recovering |= 1 << p.0;
                    } else {
                        pv.recovering &= !(1 << p.0);
                    }
                }
                continue;
            }
            if resp.term > self.term {
                return self.adopt_term(resp.term, None);
            }
            if resp.term == self.term && resp.granted {
                self.votes |= 1 << p.0;
            }
        }
        if self.role == Role::Candidate && self.votes.count_ones() as usize >= self.majority {
            return self.become_leader();
        }
        if self
            .pre_vote
            .is_some_and(|pv| pv.granted.count_ones() as usize >= self.majority)
        {
            self.start_election()?;
        }
        Ok(())
    }

    /// Publishes which voters lost their logs, once they are too many for
    /// the others to elect anyone; a leader heard clears it.
    pub(super) fn note_voters_lost(&mut self) {
        let lost = match self.pre_vote {
            Some(pv) if pv.recovering.count_ones() as usize > self.cfg.replicas - self.majority => {
                pv.recovering
            }
            Some(_) => 0,
            None if self.leader.is_some() => 0,
            None => self.voters_lost,
        };
        debug_assert!(
            lost & (1 << self.cfg.id.0) == 0,
            "we can stand, so we kept our log"
        );
        if lost != self.voters_lost {
            self.voters_lost = lost;
            self.events
                .push_back(super::Event::VotersLost { voters: lost });
        }
    }

    /// Whether we heard from a live leader of our term within the minimum
    /// election timeout (a leader: whether it still has its quorum).
    pub(super) fn leader_is_alive(&self) -> bool {
        match self.role {
            Role::Leader => true,
            Role::Candidate => false,
            Role::Follower => {
                self.leader.is_some()
                    && self
                        .leader_contact
                        .is_some_and(|at| self.now < at + self.cfg.election_timeout)
            }
        }
    }

    pub(super) fn render_vote_request(&self) -> VoteRequest {
        VoteRequest {
            term: self.pre_vote.map_or(self.term, |pv| pv.term),
            last_index: self.last_index,
            last_term: self.last_term,
            pre: self.pre_vote.is_some(),
        }
    }

    pub(super) fn render_vote_response(&self, candidate: NodeId) -> VoteResponse {
        self.pre_vote_answer[candidate.index()].unwrap_or(VoteResponse {
            term: self.term,
            granted: self.voted_for == Some(candidate),
            pre: false,
            recovering: self.is_recovering(),
        })
    }
}
