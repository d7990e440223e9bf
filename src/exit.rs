//! The exit mapping, at the top of the library: which [`ErrorClass`] any error
//! chain has, and the process exit code of each class.
//!
//! Every library error type classifies itself ([`Classify`]); only here are
//! they all named, so a front end holding an opaque chain (`anyhow`, a boxed
//! error) can find the first classifiable error in it. The codes are the ones
//! `isrctl --help` documents; nothing else spells them.

use crate::error::{Classify, ErrorClass};

/// The process exit code of a class.
pub fn code(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::Other => 1,
        ErrorClass::Invalid => 2,
        ErrorClass::WrongKey => 3,
        ErrorClass::NotFound => 4,
        ErrorClass::Conflict => 5,
        ErrorClass::Unreachable => 6,
        ErrorClass::Integrity => 7,
    }
}

/// The class of the first classifiable error in a chain of sources
/// ([`ErrorClass::Other`] where none is).
pub fn classify(error: &(dyn std::error::Error + 'static)) -> ErrorClass {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(class) = class_of(error) {
            return class;
        }
        current = error.source();
    }
    ErrorClass::Other
}

/// The class of `error` itself, if it is one of the library's error types.
fn class_of(error: &(dyn std::error::Error + 'static)) -> Option<ErrorClass> {
    macro_rules! try_class {
        ($($ty:ty),* $(,)?) => {$(
            if let Some(e) = error.downcast_ref::<$ty>() {
                return Some(e.class());
            }
        )*};
    }
    try_class!(
        crate::store::StoreError,
        crate::keys::KeyError,
        crate::chunk::ChunkError,
        crate::manifest::ManifestError,
        crate::trace::TraceError,
        crate::parcel::ParcelError,
        crate::cache::CacheError,
        crate::fetch::FetchError,
        crate::export::ExportError,
        crate::gc::GcError,
        crate::image::ImageError,
        crate::import::ImportError,
        crate::vmm::config::VmConfigError,
        crate::vmm::qmp::QmpError,
        crate::vmm::qemu::QemuError,
        crate::vmm::virtualbox::VboxError,
        crate::vmm::VmError,
        crate::session::SessionError,
        crate::control::ControlError,
        crate::config::ConfigError,
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_has_its_own_code() {
        let classes = [
            ErrorClass::Other,
            ErrorClass::Invalid,
            ErrorClass::WrongKey,
            ErrorClass::NotFound,
            ErrorClass::Conflict,
            ErrorClass::Unreachable,
            ErrorClass::Integrity,
        ];
        let codes: std::collections::BTreeSet<u8> = classes.iter().map(|&c| code(c)).collect();
        assert_eq!(codes, (1..=7).collect());
    }

    #[test]
    fn the_first_classifiable_error_in_a_chain_decides() {
        #[derive(Debug, thiserror::Error)]
        #[error("wrapper")]
        struct Wrapper(#[source] crate::store::StoreError);
        let inner = crate::store::StoreError::NotFound {
            store: "s".into(),
            key: "k".into(),
        };
        let expected = inner.class();
        assert_eq!(classify(&Wrapper(inner)), expected);
        assert_eq!(classify(&std::io::Error::other("plain")), ErrorClass::Other);
    }
}
