//! Changing the configuration file from inside Cage (the web page's settings, `cage
//! passwd`, `cage dns allow`): the text is edited line by line and validated by
//! `cage-policy` ([`edit_text`]), and only a valid result is written, atomically (a
//! temporary file in the same directory, synced, then renamed over the old one). On any
//! error the file is left byte for byte as it was.
//!
//! Editing changes the file and nothing else: a caller that wants the running `cage run`
//! to apply the change asks for it (`crate::running::request_reload`).

use std::io::Write;
use std::path::{Path, PathBuf};

pub use cage_policy::config::edit::*;

use super::{uci, Config};

/// Apply `edits` to the file at `path`: validated, then written atomically. On error the
/// file is untouched.
pub fn edit_file(path: &Path, edits: &[Edit]) -> Result<Config, EditError> {
    let text = std::fs::read_to_string(path).map_err(|source| EditError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Err(error) = uci::parse(&text) {
        return Err(EditError::Unparsable {
            path: path.to_owned(),
            error,
        });
    }
    let (new, config) = edit_text(&text, edits)?;
    if new != text {
        write_atomically(path, new.as_bytes()).map_err(|source| EditError::Write {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(config)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cage".into());
    let tmp = dir.join(format!(".{file_name}.cage-edit"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "# Cage\n\
config segment 'ai'\n\
\toption bridge 'br-cage'\n\
\toption address '192.168.10.1/24'\n";

    #[test]
    fn edit_file_leaves_the_file_untouched_on_error_and_writes_on_success() {
        let dir = std::env::temp_dir().join(format!("cage-edit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cage");
        std::fs::write(&path, BASE).unwrap();
        let err = edit_file(
            &path,
            &[Edit::set("segment", "ai", "address", "300.1.1.1/24")],
        );
        assert!(err.is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), BASE);
        let cfg = edit_file(&path, &[Edit::set("segment", "ai", "bridge", "br-ai")]).unwrap();
        assert_eq!(cfg.segment.bridge, "br-ai");
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("option bridge 'br-ai'"));
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
