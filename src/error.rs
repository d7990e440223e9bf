//! Error classes shared by every module.
//!
//! Each module has its own error enum (`StoreError`, `ManifestError`, …) and
//! implements [`Classify`] for it; an error that wraps another module's error
//! takes that error's class. This module knows none of them: the few places that
//! must classify any error chain (the exit codes, the control protocol's error
//! replies) do it in [`crate::exit`], at the top of the library.

/// What kind of failure an error is, as far as a user or script is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Anything not covered below.
    Other,
    /// Wrong passphrase or key file, or no usable keyslot.
    WrongKey,
    /// The parcel, version or path does not exist.
    NotFound,
    /// Someone else got there first (parcel exists, version already committed).
    Conflict,
    /// The store could not be reached (after retries).
    Unreachable,
    /// Stored data failed verification (bad chunk, corrupt manifest).
    Integrity,
    /// The request was invalid (bad name, bad path, unsupported operation).
    Invalid,
}

/// Implemented by every error enum of the library.
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}
