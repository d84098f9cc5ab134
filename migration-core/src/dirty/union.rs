//! Several trackers as one.
//!
//! A VMM on KVM needs at least two: KVM's dirty log for what the guest writes and the
//! `vm-memory` bitmap for what its own devices write. The union starts, syncs and stops them
//! together; each member ORs its pages into the same bitmap.

use super::{DirtyTracker, TrackerError};
use crate::bitmap::DirtyBitmap;

/// The union of several [`DirtyTracker`]s built for the same RAM layout.
///
/// When a member's sync fails, the members before it have already handed their pages to
/// the bitmap and forgotten them: treat a failed sync as a failed pass (resend everything
/// or abort), never as an empty one.
pub struct UnionTracker {
    members: Vec<Box<dyn DirtyTracker>>,
    started: usize,
}

impl UnionTracker {
    /// A union of `members`, started, synced and stopped in this order.
    pub fn new(members: Vec<Box<dyn DirtyTracker>>) -> Self {
        UnionTracker {
            members,
            started: 0,
        }
    }

    /// Adds a tracker. A running union must be stopped first, so that the newcomer's
    /// `start` lines up with the others'.
    ///
    /// # Panics
    /// If the union is started.
    pub fn push(&mut self, member: Box<dyn DirtyTracker>) {
        assert_eq!(self.started, 0, "UnionTracker::push on a started union");
        self.members.push(member);
    }

    /// The member trackers, in order.
    pub fn members(&self) -> &[Box<dyn DirtyTracker>] {
        &self.members
    }

    fn wrap(&self, index: usize, source: TrackerError) -> TrackerError {
        TrackerError::Member {
            index,
            name: self.members[index].name().to_owned(),
            source: Box::new(source),
        }
    }
}

impl DirtyTracker for UnionTracker {
    fn name(&self) -> &str {
        "union"
    }

    fn start(&mut self) -> Result<(), TrackerError> {
        for index in 0..self.members.len() {
            if let Err(e) = self.members[index].start() {
                // Leave nothing half-started: whoever gets this error owns no tracking.
                for m in self.members[..index].iter_mut().rev() {
                    if let Err(stop_err) = m.stop() {
                        tracing::warn!(tracker = m.name(), error = %stop_err, "stopping after a failed union start");
                    }
                }
                self.started = 0;
                return Err(self.wrap(index, e));
            }
            self.started = index + 1;
        }
        Ok(())
    }

    fn sync_and_clear(&mut self, into: &mut DirtyBitmap) -> Result<(), TrackerError> {
        for index in 0..self.members.len() {
            self.members[index]
                .sync_and_clear(into)
                .map_err(|e| self.wrap(index, e))?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), TrackerError> {
        // Stop every member even if one fails, then report the first failure.
        let mut first = None;
        for index in 0..self.members.len() {
            if let Err(e) = self.members[index].stop() {
                tracing::warn!(tracker = self.members[index].name(), error = %e, "stop failed");
                if first.is_none() {
                    first = Some(self.wrap(index, e));
                }
            }
        }
        self.started = 0;
        first.map_or(Ok(()), Err)
    }
}
