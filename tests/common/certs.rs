//! Certificates for the TLS tests, made with the `openssl` command in a directory of the test:
//! a CA, certificates it signs (with a subjectAltName), and expired ones.

use std::path::Path;
use std::process::Command;

/// Run `openssl` in `dir`, failing the test with its stderr.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA: `name`.crt and `name`.key.
pub fn ca(dir: &Path, name: &str) {
    let subject = format!("/CN={name}");
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", &subject,
            "-keyout", &key, "-out", &crt,
        ],
    );
}

/// A key and signing request `name`.key / `name`.csr for `cn`.
fn request(dir: &Path, name: &str, cn: &str) {
    let subject = format!("/CN={cn}");
    let (key, csr) = (format!("{name}.key"), format!("{name}.csr"));
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
    );
}

/// `name`.crt/.key for `cn`, signed by CA `ca`, valid two days, with subjectAltName `san`
/// (e.g. `DNS:localhost`).
pub fn signed(dir: &Path, ca: &str, name: &str, cn: &str, san: &str) {
    request(dir, name, cn);
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n")).unwrap();
    let (csr, crt) = (format!("{name}.csr"), format!("{name}.crt"));
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
}

/// As [`signed`], but valid on 2020-01-01 only (long expired), through `openssl ca`.
pub fn expired(dir: &Path, ca: &str, name: &str, cn: &str, san: &str) {
    request(dir, name, cn);
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "1000\n").unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        format!(
            "[ca]\ndefault_ca = test\n[test]\ndatabase = index.txt\nserial = serial\n\
             new_certs_dir = .\ndefault_md = sha256\npolicy = any\n[any]\ncommonName = supplied\n\
             [ext]\nsubjectAltName = {san}\n"
        ),
    )
    .unwrap();
    let (csr, crt) = (format!("{name}.csr"), format!("{name}.crt"));
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-cert",
            &ca_crt,
            "-keyfile",
            &ca_key,
            "-in",
            &csr,
            "-out",
            &crt,
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-extensions",
            "ext",
        ],
    );
}

/// `name`.key followed by `name`.crt in one PEM file (Kafka's PEM keystore), written to `to`.
pub fn key_and_chain(dir: &Path, name: &str, to: &Path) {
    let pem = format!(
        "{}{}",
        std::fs::read_to_string(dir.join(format!("{name}.key"))).unwrap(),
        std::fs::read_to_string(dir.join(format!("{name}.crt"))).unwrap()
    );
    std::fs::write(to, pem).unwrap();
}
