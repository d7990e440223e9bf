//! Parcel keys and keyslots.
//!
//! Every parcel has two random 32-byte secrets, kept together as
//! [`ParcelSecrets`]:
//! - the **parcel key** encrypts the parcel's manifests (XChaCha20-Poly1305);
//! - the **dedup secret** keys the convergent chunk keys (see [`crate::chunk`]).
//!   Parcels that share a dedup secret deduplicate against each other
//!   (`isrctl import --dedup-with OTHER`).
//!
//! The secrets are stored only wrapped, in keyslots (`parcels/<name>/keyslots/<n>`).
//! A slot is unlocked either by a passphrase (argon2id) or by a key file (for
//! unattended machines; blake3 `derive_key`, since a key file is already
//! high-entropy). Keyslot layout (little-endian):
//!
//! ```text
//!  0   4  magic "ISRK"
//!  4   1  format version (1)
//!  5   1  kind: 1 = passphrase (argon2id), 2 = key file
//!  6   2  reserved, zero
//!  8  16  parcel id
//! 24   4  argon2 memory cost (KiB)      } zero for key-file slots
//! 28   4  argon2 time cost (iterations) }
//! 32   4  argon2 parallelism            }
//! 36  16  salt
//! 52  24  XChaCha20 nonce
//! 76  80  ciphertext of parcel key || dedup secret (64 bytes) + 16-byte tag
//!         (AAD = bytes 0..76)
//! ```
//!
//! No type here implements `Display`; `Debug` prints `<redacted>`; every secret is
//! zeroized on drop.

use std::fmt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
pub use zeroize::Zeroizing;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Classify, ErrorClass};

const MAGIC: &[u8; 4] = b"ISRK";
const FORMAT_VERSION: u8 = 1;
const AAD_LEN: usize = 76;
/// Exact length of a keyslot object.
pub const KEYSLOT_LEN: usize = AAD_LEN + 64 + 16;
const KEY_FILE_CONTEXT: &str = "isr 2026 keyslot key-file wrapping key v1";
/// Shortest key file accepted (16 bytes of entropy).
pub const MIN_KEY_FILE_LEN: usize = 16;

macro_rules! secret_bytes {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw secret bytes.
            pub fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
            /// A fresh random secret.
            pub fn random() -> Self {
                Self(rand::random())
            }
            /// The raw bytes (for key derivation only).
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_bytes!(
    /// Encrypts the parcel's manifests.
    ParcelKey
);
secret_bytes!(
    /// Keys the convergent chunk keys; shared between parcels that dedup together.
    DedupSecret
);

/// Both secrets of one parcel.
#[derive(Debug, Clone)]
pub struct ParcelSecrets {
    /// Manifest encryption key.
    pub parcel_key: ParcelKey,
    /// Chunk dedup secret.
    pub dedup_secret: DedupSecret,
}

impl ParcelSecrets {
    /// New random secrets; `dedup_secret` reused when given (to dedup with another parcel).
    pub fn generate(dedup_secret: Option<DedupSecret>) -> ParcelSecrets {
        ParcelSecrets {
            parcel_key: ParcelKey::random(),
            dedup_secret: dedup_secret.unwrap_or_else(DedupSecret::random),
        }
    }
}

/// Argon2id cost parameters for passphrase keyslots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdfParams {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

/// The most argon2 memory a keyslot may ask for: 4 GiB (in KiB). A keyslot
/// asking for more (or for more than [`MAX_KDF_ITERATIONS`] passes or
/// [`MAX_KDF_PARALLELISM`] lanes) is refused as corrupt before anything is
/// derived: the store is not trusted to set how long a command runs. isr
/// itself writes at most what `[kdf]` allows, which has the same bounds.
pub const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// The most argon2 passes a keyslot may ask for (see [`MAX_KDF_MEMORY_KIB`]).
pub const MAX_KDF_ITERATIONS: u32 = 64;
/// The most argon2 lanes a keyslot may ask for (see [`MAX_KDF_MEMORY_KIB`]).
pub const MAX_KDF_PARALLELISM: u32 = 64;

impl KdfParams {
    /// Why these parameters are beyond isr's bounds, if they are.
    pub fn beyond_bounds(&self) -> Option<String> {
        let mut over = Vec::new();
        if self.memory_kib > MAX_KDF_MEMORY_KIB {
            over.push(format!(
                "memory {} KiB > {MAX_KDF_MEMORY_KIB}",
                self.memory_kib
            ));
        }
        if self.iterations > MAX_KDF_ITERATIONS {
            over.push(format!("{} passes > {MAX_KDF_ITERATIONS}", self.iterations));
        }
        if self.parallelism > MAX_KDF_PARALLELISM {
            over.push(format!(
                "{} lanes > {MAX_KDF_PARALLELISM}",
                self.parallelism
            ));
        }
        (!over.is_empty())
            .then(|| format!("argon2 cost beyond isr's maximum ({})", over.join(", ")))
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        KdfParams {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// What the user gave to unlock (or create) keyslots.
pub enum Credential {
    /// A passphrase (from a prompt, `--passphrase-file` or `ISR_PASSPHRASE`).
    Passphrase(Zeroizing<String>),
    /// The contents of a key file, and where it came from.
    KeyFile {
        /// File contents.
        bytes: Zeroizing<Vec<u8>>,
        /// Path, for messages.
        path: PathBuf,
    },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Passphrase(_) => f.write_str("Credential::Passphrase(<redacted>)"),
            Credential::KeyFile { path, .. } => {
                write!(f, "Credential::KeyFile({})", path.display())
            }
        }
    }
}

impl Credential {
    /// Reads a key file, refusing short ones.
    pub fn from_key_file(path: &Path) -> Result<Credential, KeyError> {
        let bytes =
            Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::KeyFileRead {
                path: path.to_owned(),
                source,
            })?);
        if bytes.len() < MIN_KEY_FILE_LEN {
            return Err(KeyError::KeyFileTooShort {
                path: path.to_owned(),
                len: bytes.len(),
            });
        }
        Ok(Credential::KeyFile {
            bytes,
            path: path.to_owned(),
        })
    }

    fn kind(&self) -> SlotKind {
        match self {
            Credential::Passphrase(_) => SlotKind::Passphrase,
            Credential::KeyFile { .. } => SlotKind::KeyFile,
        }
    }
}

/// Writes a new random key file (32 bytes, mode 0600), refusing to overwrite.
pub fn create_key_file(path: &Path) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(&bytes[..])?;
        file.sync_all()
    };
    write().map_err(|source| KeyError::KeyFileRead {
        path: path.to_owned(),
        source,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum SlotKind {
    Passphrase = 1,
    KeyFile = 2,
}

impl TryFrom<u8> for SlotKind {
    type Error = u8;
    fn try_from(value: u8) -> Result<Self, u8> {
        match value {
            1 => Ok(SlotKind::Passphrase),
            2 => Ok(SlotKind::KeyFile),
            other => Err(other),
        }
    }
}

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No keyslot of the credential's kind opened.
    #[error("wrong passphrase for parcel {parcel}")]
    WrongPassphrase {
        /// Parcel name.
        parcel: String,
    },
    /// A key file was given but does not open any slot.
    #[error("key file {} does not unlock parcel {parcel}", path.display())]
    WrongKeyFile {
        /// Parcel name.
        parcel: String,
        /// Key file path.
        path: PathBuf,
    },
    /// The parcel has no keyslot of the kind the user offered.
    #[error("parcel {parcel} has no {kind} keyslot; {hint}")]
    NoSlotOfKind {
        /// Parcel name.
        parcel: String,
        /// "passphrase" or "key-file".
        kind: &'static str,
        /// What to do instead.
        hint: &'static str,
    },
    /// No credential was given and there is no terminal to prompt on.
    #[error(
        "no passphrase for parcel {parcel} and no terminal to ask on: set ISR_PASSPHRASE, or pass --passphrase-file FILE or --key-file FILE"
    )]
    NoCredential {
        /// Parcel name.
        parcel: String,
    },
    /// A keyslot object is malformed.
    #[error("keyslot {slot} of parcel {parcel} is corrupt: {reason}")]
    CorruptSlot {
        /// Parcel name.
        parcel: String,
        /// Slot number.
        slot: u32,
        /// What is wrong.
        reason: String,
    },
    /// Reading a key file failed.
    #[error("cannot use key file {}: {source}", path.display())]
    KeyFileRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A passphrase given empty (or not as text).
    #[error("{what}: give the parcel's passphrase, or use a key file (--key-file)")]
    UnusablePassphrase {
        /// Where it came from and what is wrong, e.g. `ISR_PASSPHRASE is set but empty`.
        what: String,
    },
    /// Key file too short to be a key.
    #[error("key file {} holds {len} bytes; at least {MIN_KEY_FILE_LEN} random bytes are needed (create one with `isrctl new-key-file PATH`)", path.display())]
    KeyFileTooShort {
        /// Path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Argon2 rejected the parameters.
    #[error("invalid key derivation parameters: {0}")]
    Kdf(String),
    /// Reading a passphrase file failed.
    #[error("cannot read passphrase file {}: {source}", path.display())]
    PassphraseFileRead {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A new passphrase typed twice differently.
    #[error("the two passphrases differ; nothing was changed: type the same passphrase twice")]
    PassphraseMismatch,
}

impl Classify for KeyError {
    fn class(&self) -> ErrorClass {
        match self {
            KeyError::WrongPassphrase { .. }
            | KeyError::WrongKeyFile { .. }
            | KeyError::NoSlotOfKind { .. }
            | KeyError::NoCredential { .. } => ErrorClass::WrongKey,
            KeyError::CorruptSlot { .. } => ErrorClass::Integrity,
            KeyError::UnusablePassphrase { .. }
            | KeyError::KeyFileTooShort { .. }
            | KeyError::PassphraseMismatch => ErrorClass::Invalid,
            // A file named on the command line that is not there is an
            // input path not found (exit 4, as `isrctl --help` lists).
            KeyError::KeyFileRead { source, .. } | KeyError::PassphraseFileRead { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorClass::NotFound
            }
            _ => ErrorClass::Other,
        }
    }
}

fn wrapping_key(
    credential: &Credential,
    params: KdfParams,
    salt: &[u8; 16],
) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let mut out = Zeroizing::new([0u8; 32]);
    match credential {
        Credential::Passphrase(passphrase) => {
            let params = argon2::Params::new(
                params.memory_kib,
                params.iterations,
                params.parallelism,
                Some(32),
            )
            .map_err(|e| KeyError::Kdf(e.to_string()))?;
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                .hash_password_into(passphrase.as_bytes(), salt, &mut out[..])
                .map_err(|e| KeyError::Kdf(e.to_string()))?;
        }
        Credential::KeyFile { bytes, .. } => {
            let mut hasher = blake3::Hasher::new_derive_key(KEY_FILE_CONTEXT);
            hasher.update(salt);
            hasher.update(bytes);
            out.copy_from_slice(hasher.finalize().as_bytes());
        }
    }
    Ok(out)
}

/// Wraps `secrets` into a keyslot object for parcel `parcel_id`.
pub fn seal_keyslot(
    secrets: &ParcelSecrets,
    credential: &Credential,
    params: KdfParams,
    parcel_id: &[u8; 16],
) -> Result<Vec<u8>, KeyError> {
    let kind = credential.kind();
    let params = match kind {
        SlotKind::Passphrase => params,
        SlotKind::KeyFile => KdfParams {
            memory_kib: 0,
            iterations: 0,
            parallelism: 0,
        },
    };
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 24] = rand::random();
    let mut slot = Vec::with_capacity(KEYSLOT_LEN);
    slot.extend_from_slice(MAGIC);
    slot.push(FORMAT_VERSION);
    slot.push(kind as u8);
    slot.extend_from_slice(&[0, 0]);
    slot.extend_from_slice(parcel_id);
    slot.extend_from_slice(&params.memory_kib.to_le_bytes());
    slot.extend_from_slice(&params.iterations.to_le_bytes());
    slot.extend_from_slice(&params.parallelism.to_le_bytes());
    slot.extend_from_slice(&salt);
    slot.extend_from_slice(&nonce);
    debug_assert_eq!(slot.len(), AAD_LEN);

    let wrapping = wrapping_key(credential, params, &salt)?;
    let mut plain = Zeroizing::new([0u8; 64]);
    plain[..32].copy_from_slice(secrets.parcel_key.as_bytes());
    plain[32..].copy_from_slice(secrets.dedup_secret.as_bytes());
    let cipher = XChaCha20Poly1305::new(&Key::from(*wrapping));
    let ciphertext = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &plain[..],
                aad: &slot,
            },
        )
        .expect("encryption of 64 bytes cannot fail");
    slot.extend_from_slice(&ciphertext);
    debug_assert_eq!(slot.len(), KEYSLOT_LEN);
    Ok(slot)
}

/// Tries `credential` against every slot (slot number, bytes); returns the secrets
/// from the first slot it opens.
pub fn unlock(
    parcel: &str,
    parcel_id: &[u8; 16],
    slots: &[(u32, Vec<u8>)],
    credential: &Credential,
) -> Result<ParcelSecrets, KeyError> {
    unlock_slot(parcel, parcel_id, slots, credential).map(|(secrets, _)| secrets)
}

/// Like [`unlock`], and also says which keyslot number opened.
pub fn unlock_slot(
    parcel: &str,
    parcel_id: &[u8; 16],
    slots: &[(u32, Vec<u8>)],
    credential: &Credential,
) -> Result<(ParcelSecrets, u32), KeyError> {
    let mut tried_any = false;
    for (number, slot) in slots {
        let corrupt = |reason: &str| KeyError::CorruptSlot {
            parcel: parcel.to_owned(),
            slot: *number,
            reason: reason.to_owned(),
        };
        if slot.len() != KEYSLOT_LEN {
            return Err(corrupt(&format!(
                "{} bytes instead of {KEYSLOT_LEN}",
                slot.len()
            )));
        }
        if &slot[0..4] != MAGIC {
            return Err(corrupt("wrong magic"));
        }
        if slot[4] != FORMAT_VERSION {
            return Err(corrupt(&format!("unsupported format version {}", slot[4])));
        }
        let kind =
            SlotKind::try_from(slot[5]).map_err(|k| corrupt(&format!("unknown kind {k}")))?;
        if kind != credential.kind() {
            continue;
        }
        if &slot[8..24] != parcel_id {
            return Err(corrupt("belongs to another parcel"));
        }
        tried_any = true;
        let u32_at = |at: usize| u32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
        let params = KdfParams {
            memory_kib: u32_at(24),
            iterations: u32_at(28),
            parallelism: u32_at(32),
        };
        if kind == SlotKind::Passphrase
            && let Some(reason) = params.beyond_bounds()
        {
            return Err(corrupt(&format!(
                "{reason}: written by something other than isr, or damaged; unlock it with another keyslot, or restore the keyslot from a backup"
            )));
        }
        let salt: [u8; 16] = slot[36..52].try_into().expect("16 bytes");
        let nonce: [u8; 24] = slot[52..76].try_into().expect("24 bytes");
        let wrapping =
            wrapping_key(credential, params, &salt).map_err(|e| corrupt(&e.to_string()))?;
        let cipher = XChaCha20Poly1305::new(&Key::from(*wrapping));
        if let Ok(plain) = cipher.decrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &slot[AAD_LEN..],
                aad: &slot[..AAD_LEN],
            },
        ) {
            let plain = Zeroizing::new(plain);
            let mut parcel_key = [0u8; 32];
            let mut dedup_secret = [0u8; 32];
            parcel_key.copy_from_slice(&plain[..32]);
            dedup_secret.copy_from_slice(&plain[32..64]);
            let secrets = ParcelSecrets {
                parcel_key: ParcelKey::from_bytes(parcel_key),
                dedup_secret: DedupSecret::from_bytes(dedup_secret),
            };
            parcel_key.zeroize();
            dedup_secret.zeroize();
            return Ok((secrets, *number));
        }
    }
    let parcel = parcel.to_owned();
    Err(match credential {
        Credential::Passphrase(_) if !tried_any => KeyError::NoSlotOfKind {
            parcel,
            kind: "passphrase",
            hint: "unlock it with its key file (--key-file or ISR_KEY_FILE)",
        },
        Credential::KeyFile { .. } if !tried_any => KeyError::NoSlotOfKind {
            parcel,
            kind: "key-file",
            hint: "unlock it with its passphrase (prompt, --passphrase-file or ISR_PASSPHRASE)",
        },
        Credential::Passphrase(_) => KeyError::WrongPassphrase { parcel },
        Credential::KeyFile { path, .. } => KeyError::WrongKeyFile {
            parcel,
            path: path.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHEAP: KdfParams = KdfParams {
        memory_kib: 256,
        iterations: 1,
        parallelism: 1,
    };

    fn pass(text: &str) -> Credential {
        Credential::Passphrase(Zeroizing::new(text.to_owned()))
    }

    #[test]
    fn passphrase_slot_roundtrip_and_wrong_passphrase() {
        let secrets = ParcelSecrets::generate(None);
        let id = [5u8; 16];
        let slot = seal_keyslot(&secrets, &pass("correct horse"), CHEAP, &id).unwrap();
        assert_eq!(slot.len(), KEYSLOT_LEN);
        let slots = vec![(0, slot)];
        let opened = unlock("p", &id, &slots, &pass("correct horse")).unwrap();
        assert_eq!(opened.parcel_key, secrets.parcel_key);
        assert_eq!(opened.dedup_secret, secrets.dedup_secret);
        let err = unlock("p", &id, &slots, &pass("wrong")).unwrap_err();
        assert_eq!(err.to_string(), "wrong passphrase for parcel p");
        assert_eq!(err.class(), ErrorClass::WrongKey);
    }

    #[test]
    fn key_file_slot_and_slot_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_key_file(&path).unwrap();
        assert!(create_key_file(&path).is_err(), "must not overwrite");
        let key_file = Credential::from_key_file(&path).unwrap();
        let secrets = ParcelSecrets::generate(None);
        let id = [1u8; 16];
        let slots = vec![
            (0, seal_keyslot(&secrets, &pass("pw"), CHEAP, &id).unwrap()),
            (1, seal_keyslot(&secrets, &key_file, CHEAP, &id).unwrap()),
        ];
        let opened = unlock("p", &id, &slots, &key_file).unwrap();
        assert_eq!(opened.parcel_key, secrets.parcel_key);
        let only_pass = vec![slots[0].clone()];
        assert!(matches!(
            unlock("p", &id, &only_pass, &key_file),
            Err(KeyError::NoSlotOfKind { .. })
        ));
    }

    #[test]
    fn tampered_or_foreign_slot_is_refused() {
        let secrets = ParcelSecrets::generate(None);
        let mut slot = seal_keyslot(&secrets, &pass("pw"), CHEAP, &[1; 16]).unwrap();
        assert!(matches!(
            unlock("p", &[2; 16], &[(0, slot.clone())], &pass("pw")),
            Err(KeyError::CorruptSlot { .. })
        ));
        slot[40] ^= 1; // salt: authenticated as AAD
        assert!(matches!(
            unlock("p", &[1; 16], &[(0, slot)], &pass("pw")),
            Err(KeyError::WrongPassphrase { .. })
        ));
    }

    #[test]
    fn a_keyslot_beyond_the_kdf_bounds_is_refused_before_any_work() {
        let secrets = ParcelSecrets::generate(None);
        let id = [3u8; 16];
        let slot = seal_keyslot(&secrets, &pass("pw"), CHEAP, &id).unwrap();
        let started = std::time::Instant::now();
        for (at, value) in [
            (24, MAX_KDF_MEMORY_KIB + 1),
            (28, u32::MAX),
            (32, MAX_KDF_PARALLELISM + 1),
        ] {
            let mut bad = slot.clone();
            bad[at..at + 4].copy_from_slice(&value.to_le_bytes());
            let err = unlock("p", &id, &[(0, bad)], &pass("pw")).unwrap_err();
            assert!(matches!(err, KeyError::CorruptSlot { .. }), "{err}");
            assert_eq!(err.class(), ErrorClass::Integrity);
            let message = err.to_string();
            assert!(message.contains("beyond isr's maximum"), "{message}");
            assert!(!message.contains('\n'));
        }
        // Not a timing assertion: u32::MAX passes would run for days.
        assert!(started.elapsed() < std::time::Duration::from_secs(600));
        let at_bounds = KdfParams {
            memory_kib: MAX_KDF_MEMORY_KIB,
            iterations: MAX_KDF_ITERATIONS,
            parallelism: MAX_KDF_PARALLELISM,
        };
        assert_eq!(at_bounds.beyond_bounds(), None);
        assert_eq!(CHEAP.beyond_bounds(), None);
    }

    #[test]
    fn debug_output_is_redacted() {
        let secrets = ParcelSecrets::generate(None);
        let text = format!("{secrets:?} {:?}", pass("hunter2"));
        assert!(text.contains("redacted"));
        assert!(!text.contains("hunter2"));
        assert!(!text.contains(&hex::encode(secrets.parcel_key.as_bytes())[..8]));
    }
}
