//! No VM (`--vmm none`, or a parcel without `vm.toml`): the parcel is only
//! mounted. [`NoVm`] is the [`Vmm`] that starts nothing: booting or resuming
//! is an error saying so, and there is never a saved state, a process or a
//! step.

use super::{AdapterStatus, Ended, SavedState, Started, VmError, Vmm};

/// The adapter that runs no VM.
#[derive(Debug, Clone)]
pub struct NoVm {
    parcel: String,
}

impl NoVm {
    /// For parcel `parcel` (named in the error a start returns).
    pub fn new(parcel: &str) -> NoVm {
        NoVm {
            parcel: parcel.to_owned(),
        }
    }

    fn refuse(&self) -> VmError {
        VmError::NotRunning {
            parcel: self.parcel.clone(),
            why: "`--vmm none` runs no VM".into(),
        }
    }
}

impl Vmm for NoVm {
    fn saved_state(&self) -> Option<SavedState> {
        None
    }

    fn boot(&mut self) -> Result<Started, VmError> {
        Err(self.refuse())
    }

    fn resume(&mut self, _saved: &SavedState) -> Result<Started, VmError> {
        Err(self.refuse())
    }

    fn suspend(&mut self) -> Result<(), VmError> {
        Err(self.refuse())
    }

    fn ended(&mut self) -> Option<Ended> {
        None
    }

    fn kill(&mut self) {}

    fn status(&self) -> AdapterStatus {
        AdapterStatus::default()
    }
}
