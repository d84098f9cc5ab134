//! The seam between a migration engine and the VMM it migrates.
//!
//! An engine never reaches into a VMM: it asks through [`VmControl`] to pause and resume
//! the vCPUs, to throttle them when the guest dirties memory faster than the link carries
//! it, and to save or load the state of vCPUs and devices as opaque, versioned blobs. The
//! VMM decides what a blob holds (KVM registers, an irqchip, a virtio queue) and how it
//! checks a version it is handed; the engine only carries the blobs across.

pub use crate::stream::DeviceState;

/// The operation a [`VmError`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOp {
    /// [`VmControl::pause`].
    Pause,
    /// [`VmControl::resume`].
    Resume,
    /// [`VmControl::set_throttle`].
    Throttle,
    /// [`VmControl::save_device_state`].
    SaveState,
    /// [`VmControl::load_device_state`].
    LoadState,
}

impl std::fmt::Display for VmOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmOp::Pause => "pausing the VM",
            VmOp::Resume => "resuming the VM",
            VmOp::Throttle => "throttling the vCPUs",
            VmOp::SaveState => "saving device state",
            VmOp::LoadState => "loading device state",
        })
    }
}

/// A VMM could not do what an engine asked.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed{}: {source}", device.as_ref().map(|d| format!(" for device {d:?}")).unwrap_or_default())]
pub struct VmError {
    /// What the engine asked for.
    pub op: VmOp,
    /// The device concerned, where there is one.
    pub device: Option<String>,
    /// The VMM's own error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl VmError {
    /// An error of operation `op` caused by `source`.
    pub fn new(op: VmOp, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        VmError {
            op,
            device: None,
            source: source.into(),
        }
    }

    /// Names the device the error concerns.
    pub fn for_device(mut self, id: impl Into<String>) -> Self {
        self.device = Some(id.into());
        self
    }
}

/// What a VMM implements so that a migration engine can drive it.
///
/// The engine calls these from its own thread. On the source the order is: any number of
/// `set_throttle` while RAM is copied, then `pause`, `save_device_state`, and finally
/// either nothing more (the destination took over and the source VMM may exit) or `resume`
/// (the migration failed and the guest goes on here, with nothing lost). On the
/// destination: `load_device_state` once every blob has arrived and RAM is in place, then
/// `resume`.
pub trait VmControl: Send {
    /// Stops every vCPU and returns once none runs guest code, so RAM and device state
    /// stop changing. Pausing a paused VM is not an error.
    fn pause(&mut self) -> Result<(), VmError>;

    /// Lets the vCPUs run again. Resuming a running VM is not an error.
    fn resume(&mut self) -> Result<(), VmError>;

    /// Keeps the vCPUs from running for `percent` of the time (0 lifts the throttle; at
    /// most 99). Used by auto-converge when the guest dirties memory faster than the link.
    fn set_throttle(&mut self, percent: u8) -> Result<(), VmError>;

    /// Saves the state of every vCPU and device. Called with the VM paused.
    fn save_device_state(&mut self) -> Result<Vec<DeviceState>, VmError>;

    /// Restores the state saved by the source's [`save_device_state`](Self::save_device_state).
    /// Called with the VM paused, before the first `resume`. An unknown id or version is an
    /// error naming the device.
    fn load_device_state(&mut self, states: &[DeviceState]) -> Result<(), VmError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_operation_and_device() {
        let e = VmError::new(VmOp::LoadState, "unknown version 7").for_device("pit");
        assert_eq!(
            e.to_string(),
            "loading device state failed for device \"pit\": unknown version 7"
        );
        let e = VmError::new(VmOp::Pause, "vcpu thread gone");
        assert_eq!(e.to_string(), "pausing the VM failed: vcpu thread gone");
    }
}
