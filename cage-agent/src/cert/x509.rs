//! A self-signed X.509 v3 certificate, written in DER by hand: ECDSA P-256 with SHA-256
//! (ring, which rustls already links), a subject and issuer of one common name, a
//! validity, and the page's names and addresses as subject alternative names. That is
//! all a browser needs of a certificate it is told to trust by its key; a certificate
//! library would add about 100 KB to the binary for it (rcgen with `time`, `yasna` and
//! `pem`, measured on aarch64).

use std::net::IpAddr;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

/// id-ecPublicKey, prime256v1 and ecdsa-with-SHA256; commonName; subjectAltName.
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// A new key and its self-signed certificate: (certificate DER, PKCS#8 key DER).
pub struct Made {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

/// One DER element: `tag`, its length, `content`.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A name of one RDN: CN=`cn`.
fn name(cn: &str) -> Vec<u8> {
    let atv = seq(&[&tlv(0x06, OID_COMMON_NAME), &tlv(0x0c, cn.as_bytes())]);
    seq(&[&tlv(0x31, &atv)])
}

/// `unix` seconds as UTCTime (before 2050) or GeneralizedTime, as RFC 5280 wants.
fn time(unix: u64) -> Vec<u8> {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (y, m, d) = civil(days);
    let hms = format!("{:02}{:02}{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60);
    if y < 2050 {
        tlv(0x17, format!("{:02}{m:02}{d:02}{hms}", y % 100).as_bytes())
    } else {
        tlv(0x18, format!("{y:04}{m:02}{d:02}{hms}").as_bytes())
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's
/// days-to-civil algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A self-signed certificate for CN=`cn`, valid from `not_before` to `not_after` (Unix
/// seconds), naming `names` and `addresses`, with a new P-256 key; `serial` is the
/// serial number's 16 random bytes.
pub fn self_signed(
    cn: &str,
    names: &[String],
    addresses: &[IpAddr],
    not_before: u64,
    not_after: u64,
    mut serial: [u8; 16],
) -> Result<Made, String> {
    let rng = SystemRandom::new();
    let alg = &ECDSA_P256_SHA256_ASN1_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
        .map_err(|_| "cannot make a P-256 key".to_owned())?;
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
        .map_err(|_| "cannot read the P-256 key just made".to_owned())?;
    // A positive INTEGER with no leading zero byte.
    serial[0] = (serial[0] & 0x7f) | 0x40;
    let sig_alg = seq(&[&tlv(0x06, OID_ECDSA_SHA256)]);
    let spki = seq(&[
        &seq(&[&tlv(0x06, OID_EC_PUBLIC_KEY), &tlv(0x06, OID_P256)]),
        &tlv(0x03, &[&[0u8][..], pair.public_key().as_ref()].concat()),
    ]);
    let mut general_names = Vec::new();
    for n in names {
        general_names.extend(tlv(0x82, n.as_bytes()));
    }
    for ip in addresses {
        match ip {
            IpAddr::V4(a) => general_names.extend(tlv(0x87, &a.octets())),
            IpAddr::V6(a) => general_names.extend(tlv(0x87, &a.octets())),
        }
    }
    let mut tbs_parts: Vec<Vec<u8>> = vec![
        tlv(0xa0, &tlv(0x02, &[2])),
        tlv(0x02, &serial),
        sig_alg.clone(),
        name(cn),
        seq(&[&time(not_before), &time(not_after)]),
        name(cn),
        spki,
    ];
    if !general_names.is_empty() {
        let san = seq(&[
            &tlv(0x06, OID_SUBJECT_ALT_NAME),
            &tlv(0x04, &tlv(0x30, &general_names)),
        ]);
        tbs_parts.push(tlv(0xa3, &seq(&[&san])));
    }
    let refs: Vec<&[u8]> = tbs_parts.iter().map(Vec::as_slice).collect();
    let tbs = seq(&refs);
    let signature = pair
        .sign(&rng, &tbs)
        .map_err(|_| "cannot sign the certificate".to_owned())?;
    let cert = seq(&[
        &tbs,
        &sig_alg,
        &tlv(0x03, &[&[0u8][..], signature.as_ref()].concat()),
    ]);
    Ok(Made {
        cert,
        key: pkcs8.as_ref().to_vec(),
    })
}

/// `der` as PEM with `label`, lines of 64.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = cage_web::tls::base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_lengths() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(20_513), (2026, 3, 1));
        assert_eq!(time(0), tlv(0x17, b"700101000000Z"));
        // 2050-01-01T00:00:00Z: GeneralizedTime from 2050 on.
        assert_eq!(time(2_524_608_000), tlv(0x18, b"20500101000000Z"));
        assert_eq!(tlv(0x04, &[0; 3])[..2], [0x04, 3]);
        assert_eq!(tlv(0x04, &[0; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(0x04, &[0; 300])[..4], [0x04, 0x82, 1, 44]);
    }

    /// The certificate parses as X.509 for rustls's own parser (webpki), and its key is
    /// the certificate's.
    #[test]
    fn a_made_certificate_is_served_by_rustls() {
        let made = self_signed(
            "Cage",
            &["cage.lan".into()],
            &["192.168.8.1".parse().unwrap(), "fd00:8::1".parse().unwrap()],
            1_767_225_600,
            2_398_377_600,
            [0xff; 16],
        )
        .unwrap();
        let id = cage_web::tls::identity(
            pem("CERTIFICATE", &made.cert).as_bytes(),
            pem("PRIVATE KEY", &made.key).as_bytes(),
        )
        .unwrap();
        assert_eq!(id.fingerprint, cage_web::tls::fingerprint(&made.cert));
    }
}
