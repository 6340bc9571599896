//! `--report FILE` and `--histogram FILE`. Each is written to a temporary file beside FILE and
//! moved over it once complete: opening FILE itself truncated it before the run, so a run that
//! was refused, could not start or could not write left the user's file empty. FILE changes
//! only when a whole page (or log) is there to replace it.
//!
//! What is checked before the run, so that bad input changes nothing: the directory exists, FILE
//! is a regular file the user may write (or is new) as the kernel opens the path, the path does
//! not name a directory ("dir/."), a rename may replace FILE (not a mount point, not another
//! user's file in a sticky directory), the two outputs are not one file, and a block written to
//! the temporary file reaches the disk. What no check can promise is that the disk still has
//! room at the end of the run; that failure is reported after the run.

use std::fs::{self, File};
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};

use tempfile::TempPath;

use crate::error::Error;

/// Written and synced before the run: a file system that takes no more data (full, over quota)
/// refuses a block as it would refuse the page.
const PROBE_BYTES: usize = 4096;

/// As the kernel's own limit on a path's symbolic links (ELOOP).
const MAX_LINKS: usize = 40;

/// The longest file name (Linux's NAME_MAX, and most file systems' elsewhere).
const NAME_MAX: usize = 255;

/// The temporary file is `.NAME.` then this many random characters then this suffix.
const TEMP_RANDOM: usize = 6;
const TEMP_SUFFIX: &str = ".tmp";

/// `name`, cut to fit the temporary file's name within NAME_MAX: a name the user may give
/// (up to 255 bytes) made a temporary name 12 bytes too long. The temporary name need only be
/// recognisable, and it is cut between characters.
fn shortened(name: &str) -> &str {
    let room = NAME_MAX - ".".len() - ".".len() - TEMP_RANDOM - TEMP_SUFFIX.len();
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// An output checked and ready: a temporary file beside its target, removed when dropped.
pub(super) struct Output {
    flag: &'static str,
    /// As the user spelt it, for messages.
    given: PathBuf,
    target: PathBuf,
    /// Whether there was a file to keep as it was.
    existed: bool,
    file: File,
    temp: TempPath,
}

/// Where an output goes, checked, with nothing created yet.
struct Target {
    flag: &'static str,
    given: PathBuf,
    /// The path with its directory and any symbolic link at its end resolved: the rename then
    /// replaces the file the link points to and the link stays.
    target: PathBuf,
    existing: Option<fs::Metadata>,
}

/// Checks `--report` and `--histogram` and makes their temporary files; any refusal is a usage
/// error, given before anything (database or file) changes.
pub(super) fn prepare(
    report: Option<&Path>,
    histogram: Option<&Path>,
) -> Result<(Option<Output>, Option<Output>), Error> {
    let report = report.map(|p| Target::resolve("--report", p)).transpose()?;
    let histogram = histogram
        .map(|p| Target::resolve("--histogram", p))
        .transpose()?;
    if let (Some(r), Some(h)) = (&report, &histogram) {
        if r.is_same_file(h) {
            return Err(Error::Usage(
                "--report and --histogram name the same file: give each its own".into(),
            ));
        }
    }
    Ok((
        report.map(Target::create).transpose()?,
        histogram.map(Target::create).transpose()?,
    ))
}

fn refusal(flag: &str, given: &Path, why: impl std::fmt::Display) -> Error {
    Error::Usage(format!("cannot write {flag} {}: {why}", given.display()))
}

impl Target {
    fn resolve(flag: &'static str, given: &Path) -> Result<Target, Error> {
        let refuse = |why: String| refusal(flag, given, why);
        // What the kernel opens under this path, following every link, those in /proc/PID/fd
        // too (whose text, "pipe:[1234]", names no file): the file the rename is to replace.
        let opens = match fs::metadata(given) {
            Ok(m) if m.is_dir() => return Err(refuse("is a directory".into())),
            Ok(m) if !m.is_file() => return Err(refuse(not_a_file(&m))),
            Ok(m) => Some(m),
            // Not there, or not reachable: the walk below says why in its own words.
            Err(_) => None,
        };
        let mut path = given.to_path_buf();
        let mut link: Option<PathBuf> = None;
        let mut through_proc = false;
        for _ in 0..MAX_LINKS {
            // Path::file_name skips a trailing "/" and "/.", so "nodir/." would name "nodir".
            if names_a_directory(&path) {
                return Err(refuse(match &link {
                    _ if path.is_dir() => "is a directory".into(),
                    None => "names a directory (it ends in /, /. or /..), not a file".into(),
                    Some(text) => format!(
                        "its symbolic link points to {}, which names a directory, not a file",
                        text.display()
                    ),
                }));
            }
            let Some(name) = path.file_name().map(ToOwned::to_owned) else {
                return Err(refuse("names no file".into()));
            };
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let dir = fs::canonicalize(&parent).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    refuse(format!("its directory {} does not exist", parent.display()))
                }
                _ => refuse(format!("its directory {}: {e}", parent.display())),
            })?;
            if !dir.is_dir() {
                return Err(refuse(format!("{} is not a directory", parent.display())));
            }
            let full = dir.join(&name);
            let existing = match fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    let text = fs::read_link(&full).map_err(|e| refuse(e.to_string()))?;
                    through_proc |= dir.starts_with("/proc");
                    path = dir.join(&text);
                    link = Some(text);
                    continue;
                }
                Ok(m) => Some(m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(refuse(e.to_string())),
            };
            // /dev/stdout sent to a file: the rename would replace the file under its name,
            // while what the descriptor writes (the run's own output) went on into the old one.
            if through_proc {
                return Err(refuse(
                    "a link to an open file descriptor (as /dev/stdout, /proc/self/fd/N): \
                     the finished output replaces a file by its name, not the descriptor's \
                     file; name the file itself"
                        .into(),
                ));
            }
            let same = match (&opens, &existing) {
                (Some(a), Some(b)) => same_inode(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                return Err(refuse(format!(
                    "it opens another file than {}, the one a rename would replace; \
                     name the file itself",
                    full.display()
                )));
            }
            let target = Target {
                flag,
                given: given.to_path_buf(),
                target: full,
                existing,
            };
            return target.check();
        }
        Err(refuse("too many levels of symbolic links".into()))
    }

    fn check(self) -> Result<Target, Error> {
        let refuse = |why: String| refusal(self.flag, &self.given, why);
        match &self.existing {
            Some(m) if m.is_dir() => Err(refuse("is a directory".into())),
            // A device or a pipe cannot be replaced by a rename, and the only check of whether
            // one takes data (/dev/full does not) is to write to it.
            Some(m) if !m.is_file() => Err(refuse(not_a_file(m))),
            // Opened without truncating: proves the permission and changes nothing.
            Some(_) => match fs::OpenOptions::new().write(true).open(&self.target) {
                Ok(_) => Ok(self),
                Err(e) => Err(refuse(e.to_string())),
            },
            None => Ok(self),
        }
    }

    fn is_same_file(&self, other: &Target) -> bool {
        let same_inode = match (&self.existing, &other.existing) {
            (Some(a), Some(b)) => same_inode(a, b),
            _ => false,
        };
        same_inode || self.target == other.target
    }

    fn create(self) -> Result<Output, Error> {
        let refuse = |why: String| refusal(self.flag, &self.given, why);
        let (dir, name) = match (self.target.parent(), self.target.file_name()) {
            (Some(dir), Some(name)) => (dir, name),
            _ => return Err(refuse("names no file".into())),
        };
        let prefix = format!(".{}.", shortened(&name.to_string_lossy()));
        let mut builder = tempfile::Builder::new();
        builder
            .prefix(&prefix)
            .rand_bytes(TEMP_RANDOM)
            .suffix(TEMP_SUFFIX);
        let temp = new_file_permissions(&mut builder)
            .tempfile_in(dir)
            .map_err(|e| refuse(format!("cannot create a file in {}: {e}", dir.display())))?;
        let (mut file, temp) = temp.into_parts();
        if let Some(m) = &self.existing {
            let mine = file.metadata().map_err(|e| refuse(e.to_string()))?;
            replaceable(&self.target, dir, m, &mine).map_err(refuse)?;
            keep_owner_and_mode(&file, m).map_err(|e| refuse(e.to_string()))?;
        }
        let probe = |file: &mut File| -> io::Result<()> {
            file.write_all(&[0; PROBE_BYTES])?;
            file.sync_all()?;
            file.set_len(0)?;
            file.rewind()
        };
        probe(&mut file).map_err(|e| refuse(e.to_string()))?;
        Ok(Output {
            flag: self.flag,
            given: self.given,
            existed: self.existing.is_some(),
            target: self.target,
            file,
            temp,
        })
    }
}

impl Output {
    /// The temporary file, to write the output into.
    pub(super) fn writer(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// Moves the output, once `written`, over its target: on disk first, so that a crash cannot
    /// leave an empty file where the old one was. On failure the target is as it was and the
    /// error names the output.
    pub(super) fn finish(self, written: io::Result<()>) -> Result<(), String> {
        let Output {
            flag,
            given,
            target,
            existed,
            file,
            temp,
        } = self;
        let kept = if existed {
            format!("{} is as it was", given.display())
        } else {
            "no file was made".to_string()
        };
        written
            .and_then(|()| file.sync_all())
            .and_then(|()| temp.persist(&target).map_err(|e| e.error))
            .map_err(|e| format!("{flag} {} ({e}; {kept})", given.display()))
    }
}

/// Whether a path as spelt names a directory: it ends in "/", "/." or "/.." (or is "." or
/// ".."), whatever is there. The kernel then opens no file under it, and refuses to make one.
fn names_a_directory(path: &Path) -> bool {
    let bytes = path.as_os_str().as_encoded_bytes();
    let separator = |b: &u8| b.is_ascii() && std::path::is_separator(char::from(*b));
    !bytes.is_empty() && matches!(bytes.rsplit(separator).next(), Some(b"" | b"." | b".."))
}

/// Why a path that is not a regular file, a directory aside, cannot be an output.
fn not_a_file(m: &fs::Metadata) -> String {
    format!(
        "not a regular file ({}): only a file can be replaced by the finished output; \
         name a file and read it from there",
        kind(m)
    )
}

#[cfg(unix)]
fn kind(m: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_fifo() {
        "a pipe"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "a device, a pipe or a socket"
    }
}

#[cfg(not(unix))]
fn kind(_: &fs::Metadata) -> &'static str {
    "a device, a pipe or a socket"
}

/// Hard links are one file under two names.
#[cfg(unix)]
fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_inode(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    false
}

/// Whether a rename of the temporary file (whose metadata is `temp`) may replace `target`
/// (`old`): writing to the file proves nothing of it, and a rename refused at the end comes after
/// the run's work is committed.
#[cfg(unix)]
fn replaceable(
    target: &Path,
    dir: &Path,
    old: &fs::Metadata,
    temp: &fs::Metadata,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // A rename moves a name within one mount: a file mounted over the name (`mount --bind`,
    // from the same file system or another) is in its way (EBUSY, EXDEV).
    if old.dev() != temp.dev() || is_mount_point(target) {
        return Err(
            "is a mount point, which a file cannot be moved over; name the file it is mounted from"
                .into(),
        );
    }
    // In a sticky directory (mode 1777, as /tmp) only the file's owner or the directory's may
    // replace it. The temporary file is ours: its owner is who the kernel checks. Root is taken
    // to hold CAP_FOWNER, which exempts it.
    const STICKY: u32 = 0o1000;
    let me = temp.uid();
    let d = fs::metadata(dir).map_err(|e| format!("its directory {}: {e}", dir.display()))?;
    if d.mode() & STICKY != 0 && me != 0 && old.uid() != me && d.uid() != me {
        return Err(format!(
            "it belongs to another user, in a sticky directory ({}) where only its owner may \
             replace it; name a file of your own",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn replaceable(_: &Path, _: &Path, _: &fs::Metadata, _: &fs::Metadata) -> Result<(), String> {
    Ok(())
}

/// Whether `path` is where something is mounted, by the process's mount table (a bind mount of
/// a file shares the device of its directory: only the table tells). Without /proc: taken not.
#[cfg(target_os = "linux")]
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(table) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.as_os_str().as_bytes();
    table
        .split(|b| *b == b'\n')
        .filter_map(|line| line.split(|b| *b == b' ').nth(4))
        .any(|mount_point| unescape_octal(mount_point) == path)
}

#[cfg(not(target_os = "linux"))]
fn is_mount_point(_: &Path) -> bool {
    false
}

/// The mount table writes a space, tab, newline and backslash in a path as `\ooo`.
#[cfg(target_os = "linux")]
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut rest = field;
    while let Some((&b, tail)) = rest.split_first() {
        let code = tail.get(..3).filter(|_| b == b'\\').and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match code {
            Some(c) => {
                out.push(c);
                rest = tail.get(3..).unwrap_or_default();
            }
            None => {
                out.push(b);
                rest = tail;
            }
        }
    }
    out
}

/// 0666 less the umask, as `File::create` would make it (tempfile's default is 0600).
#[cfg(unix)]
fn new_file_permissions<'a, 'b>(
    builder: &'b mut tempfile::Builder<'a, 'a>,
) -> &'b mut tempfile::Builder<'a, 'a> {
    use std::os::unix::fs::PermissionsExt;
    builder.permissions(fs::Permissions::from_mode(0o666))
}

#[cfg(not(unix))]
fn new_file_permissions<'a, 'b>(
    builder: &'b mut tempfile::Builder<'a, 'a>,
) -> &'b mut tempfile::Builder<'a, 'a> {
    builder
}

/// The replacement keeps what the user set on the file it replaces.
#[cfg(unix)]
fn keep_owner_and_mode(file: &File, old: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    // A user who is not root cannot give a file away: it is then theirs, as a new file would be.
    let _ = std::os::unix::fs::fchown(file, Some(old.uid()), Some(old.gid()));
    file.set_permissions(fs::Permissions::from_mode(old.mode() & 0o7777))
}

#[cfg(not(unix))]
fn keep_owner_and_mode(file: &File, old: &fs::Metadata) -> io::Result<()> {
    file.set_permissions(old.permissions())
}
