//! External command lines (`virsh`, `VBoxManage`): run them in order when the
//! program is installed here, or hand them to the user to run.
//!
//! A step is a program and its arguments (`Vec<String>`), never a shell line,
//! so no name or path in it is ever interpreted by a shell. A failed step
//! stops the sequence and is a [`VmError::Step`] naming the command, how it
//! ended and its last output lines. The libvirt and VirtualBox adapters
//! ([`super::libvirt`], [`super::virtualbox`]) use this; QEMU does not.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::{Started, VmError};

/// Whether `program` is found on `PATH` (or is an existing path).
pub fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The steps as text to print: one indented command line per line.
pub fn steps_text(steps: &[Vec<String>]) -> String {
    steps
        .iter()
        .map(|step| format!("  {}", step.join(" ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs one command line (program and arguments, no stdin) and captures
/// its output.
pub fn capture(step: &[String]) -> std::io::Result<Output> {
    let (program, args) = step.split_first().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "an empty command line")
    })?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Runs command lines in order, stopping at the first that fails.
pub fn run_steps(steps: &[Vec<String>]) -> Result<(), VmError> {
    for step in steps {
        let Some(program) = step.first() else {
            continue;
        };
        let output = capture(step).map_err(|source| VmError::Io {
            what: format!("running {program}"),
            source,
        })?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr).into_owned()
                + &String::from_utf8_lossy(&output.stdout);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            return Err(VmError::Step {
                command: step.join(" "),
                status: output.status.to_string(),
                output: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            });
        }
    }
    Ok(())
}

/// Runs `steps` if `program` is installed ([`Started::Running`]); otherwise
/// leaves them to be run by the user ([`Started::Handed`]).
pub fn run_or_hand(program: &str, steps: &[Vec<String>]) -> Result<Started, VmError> {
    if installed(program) {
        run_steps(steps)?;
        Ok(Started::Running)
    } else {
        Ok(Started::Handed)
    }
}

/// The answer to suspending a handed VM: the steps that would save it, to run
/// by hand (the program is the first step's).
pub fn handed(steps: &[Vec<String>]) -> VmError {
    VmError::NotInstalled {
        program: steps
            .first()
            .and_then(|s| s.first())
            .cloned()
            .unwrap_or_default(),
        steps: steps_text(steps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_that_fail_name_the_command() {
        let error = run_steps(&[vec!["false".to_owned()]]).unwrap_err();
        assert!(error.to_string().contains("`false` failed"), "{error}");
        run_steps(&[vec!["true".to_owned()]]).unwrap();
    }
}
