//! The web page's certificate: Cage's own, self-signed, made at first start in the state
//! directory (`web-cert.pem`, and `web-key.pem` with mode 0600), or the one the firmware
//! already has (`cage.main.web_cert` and `web_key`: uhttpd's `/etc/uhttpd.crt` and
//! `/etc/uhttpd.key`, GL.iNet's nginx's), read as PEM or DER. The web page (`web`)
//! serves it and `cage status` shows its SHA-256 fingerprint, so the owner can compare
//! it with what the browser shows.
//!
//! A certificate that cannot be read or served is an error that names the file and what
//! is wrong with it; Cage never replaces a file it did not make, and never overwrites its
//! own (a broken one is reported: remove both files to have new ones made).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use cage_web::tls::Identity;
use cage_web::tls::TlsError;

use crate::config::{Config, WebTls};

mod x509;

/// Cage's own certificate and key, in the state directory.
pub const OWN_CERT: &str = "web-cert.pem";
pub const OWN_KEY: &str = "web-key.pem";

/// Why the page has no certificate to serve.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read the web page's {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the web page's {what} {path}: {message}")]
    Bad {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("cannot make the web page's certificate in {dir}: {message}")]
    Make { dir: PathBuf, message: String },
}

/// The certificate's and the key's files, and whether they are Cage's own.
pub fn paths(cfg: &Config) -> (PathBuf, PathBuf, bool) {
    match &cfg.main.web_tls {
        WebTls::Own => (
            cfg.main.state_dir.join(OWN_CERT),
            cfg.main.state_dir.join(OWN_KEY),
            true,
        ),
        WebTls::Files { cert, key } => (cert.clone(), key.clone(), false),
    }
}

/// The certificate the configuration names, as it is on disk now; nothing is made.
pub fn load(cfg: &Config) -> Result<Identity, CertError> {
    let (cert, key, own) = paths(cfg);
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| CertError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let (cert_bytes, key_bytes) = (read("certificate", &cert)?, read("key", &key)?);
    cage_web::tls::identity(&cert_bytes, &key_bytes).map_err(|e| {
        let (what, path) = match e {
            TlsError::Key(_) => ("key", key.clone()),
            TlsError::Mismatch => ("key", key.clone()),
            _ => ("certificate", cert.clone()),
        };
        let mut message = match e {
            TlsError::Mismatch => format!("is not the key of {}", cert.display()),
            e => e.to_string(),
        };
        if own {
            message.push_str(&format!(
                " (Cage's own: remove {} and {} to have new ones made at the next start)",
                cert.display(),
                key.display()
            ));
        } else {
            message.push_str(" (cage.main.web_cert and web_key)");
        }
        CertError::Bad {
            what,
            path,
            message,
        }
    })
}

/// What [`load_or_make`] found.
#[derive(Debug)]
pub struct Loaded {
    pub identity: Identity,
    /// Where the certificate is.
    pub path: PathBuf,
    /// Whether it was made just now.
    pub made: bool,
}

/// The certificate to serve: Cage's own, made now if neither of its files exists yet
/// (named for `names` and `addresses`, the page's names and addresses now), or the
/// configured one.
pub fn load_or_make(
    cfg: &Config,
    names: &[String],
    addresses: &[IpAddr],
) -> Result<Loaded, CertError> {
    let (cert, key, own) = paths(cfg);
    let made = own && !cert.exists() && !key.exists();
    if made {
        make(&cfg.main.state_dir, &cert, &key, names, addresses)?;
    }
    Ok(Loaded {
        identity: load(cfg)?,
        path: cert,
        made,
    })
}

/// Which files the certificate and key are, and their modification times and sizes.
pub type Stamp = (PathBuf, PathBuf, [Option<(SystemTime, u64)>; 2]);

/// The certificate's [`Stamp`] now: a change means the page should load it again.
pub fn stamp(cfg: &Config) -> Stamp {
    let (cert, key, _) = paths(cfg);
    let of = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let stamps = [of(&cert), of(&key)];
    (cert, key, stamps)
}

/// A self-signed ECDSA P-256 certificate for "Cage" (`x509`), valid from a day ago for
/// 20 years (the owner trusts it by its fingerprint, not its dates), with the page's
/// names and addresses as subject alternative names. The key is written first, mode
/// 0600, both atomically.
fn make(
    dir: &Path,
    cert: &Path,
    key: &Path,
    names: &[String],
    addresses: &[IpAddr],
) -> Result<(), CertError> {
    let failed = |message: String| CertError::Make {
        dir: dir.to_owned(),
        message,
    };
    let mut serial = [0u8; 16];
    random(&mut serial).map_err(failed)?;
    let now = crate::clock::unix_now();
    let made = x509::self_signed(
        "Cage",
        names,
        addresses,
        now.saturating_sub(86_400),
        now + 20 * 31_556_952,
        serial,
    )
    .map_err(failed)?;
    std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
    write_atomically(key, x509::pem("PRIVATE KEY", &made.key).as_bytes(), 0o600).map_err(failed)?;
    write_atomically(cert, x509::pem("CERTIFICATE", &made.cert).as_bytes(), 0o644)
        .map_err(failed)?;
    Ok(())
}

/// Random bytes from the system.
fn random(buf: &mut [u8]) -> Result<(), String> {
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, buf))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))
}

/// `bytes` to `path` by a temporary file of mode `mode` in the same directory, synced,
/// then renamed over it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, extra: &str) -> Config {
        let path = dir.join("cage");
        std::fs::write(
            &path,
            format!(
                "config cage 'main'\n\toption state_dir '{d}/state'\n\toption log_dir '{d}/log'\n{extra}",
                d = dir.display()
            ),
        )
        .unwrap();
        crate::config::load(&path).unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cage-cert-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_own_certificate_is_made_once_with_a_private_key_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir("own");
        let cfg = config(&dir, "");
        let first = load_or_make(
            &cfg,
            &["cage.lan".into()],
            &["192.168.8.1".parse().unwrap()],
        )
        .unwrap();
        assert!(first.made);
        let key = dir.join("state").join(OWN_KEY);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key is the owner's only");
        let again = load_or_make(&cfg, &[], &[]).unwrap();
        assert!(!again.made, "made a second time");
        assert_eq!(again.identity.fingerprint, first.identity.fingerprint);
        assert_eq!(load(&cfg).unwrap().fingerprint, first.identity.fingerprint);
        let der = cage_web::tls::parse_chain(&std::fs::read(&first.path).unwrap()).unwrap();
        assert_eq!(
            cage_web::tls::fingerprint(&der[0]),
            first.identity.fingerprint
        );
        assert_eq!(first.identity.fingerprint.len(), 32 * 3 - 1);

        // A broken own certificate is reported, not replaced.
        std::fs::write(&first.path, b"garbage").unwrap();
        let err = load_or_make(&cfg, &[], &[]).unwrap_err().to_string();
        assert!(
            err.contains("web-cert.pem") && err.contains("remove"),
            "{err}"
        );
        assert_eq!(std::fs::read(&first.path).unwrap(), b"garbage");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_configured_certificate_is_read_as_pem_or_der_and_checked_against_its_key() {
        let dir = tempdir("files");
        // Two of Cage's own, made in two state directories, as the firmware's files.
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        let a = config(&dir.join("a"), "");
        let b = config(&dir.join("b"), "");
        let made_a = load_or_make(&a, &[], &[]).unwrap();
        load_or_make(&b, &[], &[]).unwrap();
        let (a_cert, a_key, _) = paths(&a);
        let (_, b_key, _) = paths(&b);
        let files = |cert: &Path, key: &Path| {
            config(
                &dir,
                &format!(
                    "\toption web_cert '{}'\n\toption web_key '{}'\n",
                    cert.display(),
                    key.display()
                ),
            )
        };
        assert_eq!(
            load(&files(&a_cert, &a_key)).unwrap().fingerprint,
            made_a.identity.fingerprint
        );
        // DER, as uhttpd's px5g writes them: the key in PKCS#8 here.
        let der_cert = dir.join("uhttpd.crt");
        let der_key = dir.join("uhttpd.key");
        let chain = cage_web::tls::parse_chain(&std::fs::read(&a_cert).unwrap()).unwrap();
        std::fs::write(&der_cert, chain[0].as_ref()).unwrap();
        let pem_key = std::fs::read_to_string(&a_key).unwrap();
        let body: String = pem_key
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        std::fs::write(&der_key, base64_decode(&body)).unwrap();
        assert_eq!(
            load(&files(&der_cert, &der_key)).unwrap().fingerprint,
            made_a.identity.fingerprint
        );
        // Another certificate's key.
        let err = load(&files(&a_cert, &b_key)).unwrap_err().to_string();
        assert!(err.contains("is not the key of"), "{err}");
        // A file that is not there.
        let err = load(&files(&dir.join("none.crt"), &a_key))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot read the web page's certificate"),
            "{err}"
        );
        // Never made for the firmware's files.
        let missing = files(&dir.join("none.crt"), &dir.join("none.key"));
        assert!(load_or_make(&missing, &[], &[]).is_err());
        assert!(!dir.join("none.crt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|c| *c != b'=') {
            acc = acc << 6 | ABC.iter().position(|a| *a == c).unwrap() as u32;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        out
    }
}
