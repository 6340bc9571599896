//! The exit codes `bank` promises. Other programs branch on them, so each has one meaning.

/// How `bank` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Success,
    /// It failed and nothing was applied (or `verify`/`workload` found a violation).
    Failure,
    /// Bad usage or input, refused before the database was touched.
    Usage,
    /// A transfer may or may not have been applied; a rerun with the same `--id` settles it.
    OutcomeUnknown,
}

impl From<ExitCode> for i32 {
    fn from(code: ExitCode) -> i32 {
        match code {
            ExitCode::Success => 0,
            ExitCode::Failure => 1,
            ExitCode::Usage => 2,
            ExitCode::OutcomeUnknown => 3,
        }
    }
}

impl From<ExitCode> for std::process::ExitCode {
    fn from(code: ExitCode) -> std::process::ExitCode {
        // Every code above fits in a u8.
        std::process::ExitCode::from(i32::from(code) as u8)
    }
}
