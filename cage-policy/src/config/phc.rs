//! `cage.main.password_hash`: whether a value is an argon2 PHC string. Hashing and
//! verifying passwords is the web page's (`cage-web`); the validator only needs to know
//! that the stored string is one argon2 can run with.

use password_hash::PasswordHash;

/// Whether `s` is an argon2 PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), as
/// `cage.main.password_hash` must be. The error says what would be accepted.
pub fn check(s: &str) -> Result<(), String> {
    let hash = PasswordHash::new(s).map_err(|e| {
        format!(
            "is not a PHC string ({e}); set it with `cage passwd`, e.g. \
             $argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>"
        )
    })?;
    if !matches!(hash.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d") {
        return Err(format!(
            "names the algorithm '{}'; only argon2 hashes are accepted (`cage passwd` \
             writes argon2id)",
            hash.algorithm
        ));
    }
    if hash.hash.is_none() || hash.salt.is_none() {
        return Err("has no salt or no hash; set it with `cage passwd`".into());
    }
    // The parameters must be ones argon2 can run with.
    argon2::Params::try_from(&hash).map_err(|e| format!("has unusable parameters ({e})"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use password_hash::SaltString;

    #[test]
    fn phc_strings_are_checked() {
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        let h = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password(b"correct horse", &salt)
        .unwrap()
        .to_string();
        assert!(check(&h).is_ok(), "{h}");
        for (bad, why) in [
            ("", "is not a PHC string"),
            ("hunter2", "is not a PHC string"),
            ("$md5$abc", "is not a PHC string"),
            (
                "$scrypt$ln=16,r=8,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "only argon2",
            ),
            ("$argon2id$v=19$m=64,t=1,p=1", "no salt or no hash"),
            (
                "$argon2id$v=19$m=1,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "unusable parameters",
            ),
        ] {
            let e = check(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
