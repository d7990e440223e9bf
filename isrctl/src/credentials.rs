//! Where the parcel passphrase or key file comes from: `--key-file`,
//! `ISR_PASSPHRASE`, `--passphrase-file`, or a prompt on the terminal.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::Context;
use isr::keys::{Credential, KeyError};
use zeroize::Zeroizing;

/// How credentials are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Unlock an existing parcel.
    Unlock,
    /// Create a parcel: a prompted passphrase is asked twice.
    Create,
}

/// Whether a passphrase can be asked for on a terminal.
pub fn terminal_available() -> bool {
    std::io::stdin().is_terminal() || std::fs::File::open("/dev/tty").is_ok()
}

/// The first line of a passphrase file (must not be empty).
pub fn read_passphrase_file(path: &Path) -> anyhow::Result<Zeroizing<String>> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        KeyError::PassphraseFileRead {
            path: path.to_owned(),
            source,
        }
    })?);
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(KeyError::UnusablePassphrase {
            what: format!("passphrase file {} is empty", path.display()),
        }
        .into());
    }
    Ok(Zeroizing::new(line.to_owned()))
}

/// Asks for a parcel's passphrase on the terminal (twice when creating).
pub fn prompt(parcel: &str, purpose: Purpose) -> anyhow::Result<Zeroizing<String>> {
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("Passphrase for parcel {parcel}: "))
            .context("reading the passphrase")?,
    );
    if first.is_empty() {
        return Err(KeyError::UnusablePassphrase {
            what: "empty passphrase refused".into(),
        }
        .into());
    }
    if purpose == Purpose::Create {
        let again = Zeroizing::new(
            rpassword::prompt_password("Same passphrase again: ")
                .context("reading the passphrase")?,
        );
        if *again != *first {
            return Err(KeyError::PassphraseMismatch.into());
        }
    }
    Ok(first)
}

/// Every credential the user gave, prompting only when none was given.
pub fn gather(
    parcel: &str,
    purpose: Purpose,
    passphrase_file: Option<&Path>,
    key_file: Option<&Path>,
) -> anyhow::Result<Vec<Credential>> {
    let mut credentials = given(passphrase_file, key_file)?;
    if credentials.is_empty() {
        if !terminal_available() {
            return Err(KeyError::NoCredential {
                parcel: parcel.to_owned(),
            }
            .into());
        }
        credentials.push(Credential::Passphrase(prompt(parcel, purpose)?));
    }
    Ok(credentials)
}

/// The credentials given by option or environment, without prompting.
pub fn given(
    passphrase_file: Option<&Path>,
    key_file: Option<&Path>,
) -> anyhow::Result<Vec<Credential>> {
    let mut credentials = Vec::new();
    if let Some(path) = key_file {
        credentials.push(Credential::from_key_file(path)?);
    }
    if let Some(passphrase) = std::env::var_os("ISR_PASSPHRASE") {
        let unusable = |what: &str| KeyError::UnusablePassphrase { what: what.into() };
        let passphrase = passphrase
            .into_string()
            .map_err(|_| unusable("ISR_PASSPHRASE is not valid UTF-8"))?;
        if passphrase.is_empty() {
            return Err(unusable("ISR_PASSPHRASE is set but empty").into());
        }
        credentials.push(Credential::Passphrase(Zeroizing::new(passphrase)));
    } else if let Some(path) = passphrase_file {
        credentials.push(Credential::Passphrase(read_passphrase_file(path)?));
    }
    Ok(credentials)
}
