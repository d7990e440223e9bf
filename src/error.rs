//! Error classes shared by every module, and the process exit codes they map to.
//!
//! Each module has its own error enum (`StoreError`, `ManifestError`, …). They all
//! implement [`Classify`], so a front end can turn any error chain into one of a
//! few documented exit codes without knowing every variant.

/// What kind of failure an error is, as far as a user or script is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl ErrorClass {
    /// The process exit code documented in `isrctl --help`.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorClass::Other => 1,
            ErrorClass::Invalid => 2,
            ErrorClass::WrongKey => 3,
            ErrorClass::NotFound => 4,
            ErrorClass::Conflict => 5,
            ErrorClass::Unreachable => 6,
            ErrorClass::Integrity => 7,
        }
    }
}

/// Implemented by every error enum of the library.
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

/// Finds the first classifiable error in a chain of `std::error::Error` sources.
pub fn classify(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        macro_rules! try_class {
            ($($ty:ty),*) => {$(
                if let Some(e) = error.downcast_ref::<$ty>() {
                    return e.class();
                }
            )*};
        }
        try_class!(
            crate::store::StoreError,
            crate::keys::KeyError,
            crate::manifest::ManifestError,
            crate::parcel::ParcelError,
            crate::config::ConfigError,
            crate::import::ImportError,
            crate::export::ExportError,
            crate::gc::GcError,
            crate::cache::CacheError,
            crate::session::SessionError,
            crate::control::ControlError,
            crate::vmm::config::VmConfigError
        );
        current = error.source();
    }
    ErrorClass::Other
}
