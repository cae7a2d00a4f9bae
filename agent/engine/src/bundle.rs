//! Rule bundles: versioned, signed sets of YARA sources and indicator lists.
//!
//! A bundle is an encoded [`BundleContent`] (name, version, creation time, publisher, files),
//! signed with a maintainer's Ed25519 key. The encoding is canonical: files sorted by path,
//! unique, and [`decode`] refuses bytes that do not re-encode to themselves, so the signature
//! covers exactly what an agent applies. Only sources travel; every agent compiles them itself.
//!
//! Keys on disk are standard PEM: the private key as PKCS#8 (`PRIVATE KEY`), the public key as
//! SubjectPublicKeyInfo (`PUBLIC KEY`), both readable by `openssl pkey`.

use std::path::{Component, Path, PathBuf};

use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
pub use vedette_proto::v1::{BundleContent, BundleFile};

use crate::rules::{is_yara_file, rule_files_under};
use crate::{IocKind, Origin, Problem, ProblemKind, RuleSet, RuleSetBuilder};

/// Largest encoded content (under the protocol's message cap, with room for the envelope).
pub const MAX_CONTENT_BYTES: usize = 12 * 1024 * 1024;
/// Most files in a bundle.
pub const MAX_FILES: usize = 10_000;
/// Longest file path inside a bundle.
pub const MAX_PATH: usize = 255;
/// Longest bundle name or publisher.
pub const MAX_NAME: usize = 128;
/// Where bundle files appear in problems and detections: `bundle:<path>`.
pub const ORIGIN_PREFIX: &str = "bundle:";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read `{path}`: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {source}")]
    BadKey { path: PathBuf, source: KeyError },
    #[error("cannot write `{path}`: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad bundle: {0}")]
    Malformed(String),
    #[error("the bundle is not signed")]
    Unsigned,
    #[error("the bundle is signed by key {0}, which is not trusted here")]
    UntrustedSigner(String),
    #[error("the bundle's signature does not match its content (altered after signing?)")]
    BadSignature,
    #[error(
        "the bundle is for the fleet whose CA has fingerprint `{bundle}`, not this one (`{here}`)"
    )]
    OtherFleet { bundle: String, here: String },
}

/// Why a key could not be read or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not PEM: {0}")]
    NotPem(#[from] pem::PemError),
    #[error("a PUBLIC KEY block that is not an Ed25519 key")]
    NotEd25519,
    #[error("no PUBLIC KEY block")]
    NoPublicKey,
    #[error("a `{0}` block, not a PRIVATE KEY")]
    NotPrivateKey(String),
    #[error("not an Ed25519 PKCS#8 key: {0}")]
    BadPkcs8(String),
    #[error("cannot generate a key")]
    Generate,
}

/// An Ed25519 public key of a maintainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn from_bytes(b: &[u8]) -> Option<PublicKey> {
        b.try_into().ok().map(PublicKey)
    }

    /// Hex of the key: how it is shown and stored.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// SHA-256 of the raw key, hex: what `--maintainer-key-sha256` pins.
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(self.0))
    }

    /// Short id for messages: the first 16 hex digits of the key's SHA-256.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        pem::encode(&pem::Pem::new("PUBLIC KEY", der))
    }

    /// Every `PUBLIC KEY` block of a PEM text (a file may hold several).
    pub fn parse_pem(text: &str) -> Result<Vec<PublicKey>, KeyError> {
        let blocks = pem::parse_many(text)?;
        let mut keys = Vec::new();
        for b in blocks.iter().filter(|b| b.tag() == "PUBLIC KEY") {
            let der = b.contents();
            match der
                .strip_prefix(&SPKI_PREFIX[..])
                .and_then(PublicKey::from_bytes)
            {
                Some(k) => keys.push(k),
                None => return Err(KeyError::NotEd25519),
            }
        }
        if keys.is_empty() {
            return Err(KeyError::NoPublicKey);
        }
        Ok(keys)
    }

    pub fn load(path: &Path) -> Result<Vec<PublicKey>, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Read {
            path: path.to_owned(),
            source,
        })?;
        PublicKey::parse_pem(&text).map_err(|source| BundleError::BadKey {
            path: path.to_owned(),
            source,
        })
    }
}

/// Writes a new maintainer key pair: `PREFIX.key` (PKCS#8 PEM, 0600) and `PREFIX.pub` (SPKI
/// PEM). Never overwrites: an existing file is an error and nothing is replaced.
pub fn write_key_pair(prefix: &Path) -> Result<(PathBuf, PathBuf, PublicKey), BundleError> {
    let (private, public) = SigningKey::generate().map_err(|source| BundleError::BadKey {
        path: prefix.to_owned(),
        source,
    })?;
    let with = |suffix: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let (key, pubf) = (with(".key"), with(".pub"));
    write_new(&key, private.as_bytes(), 0o600)?;
    write_new(&pubf, public.to_pem().as_bytes(), 0o644)?;
    Ok((key, pubf, public))
}

/// Creates `path` with `mode` (it must not exist), writes and syncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), BundleError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents).and_then(|()| f.sync_all()))
        .map_err(|source| BundleError::Write {
            path: path.to_owned(),
            source,
        })
}

/// A maintainer's signing key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A new key: the private key PEM (PKCS#8) and the public key.
    pub fn generate() -> Result<(String, PublicKey), KeyError> {
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| KeyError::Generate)?;
        let public = PublicKey::from_bytes(pair.public_key().as_ref()).ok_or(KeyError::Generate)?;
        Ok((
            pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec())),
            public,
        ))
    }

    pub fn from_pem(text: &str) -> Result<SigningKey, KeyError> {
        let block = pem::parse(text)?;
        if block.tag() != "PRIVATE KEY" {
            return Err(KeyError::NotPrivateKey(block.tag().to_string()));
        }
        Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map(SigningKey)
            .map_err(|e| KeyError::BadPkcs8(e.to_string()))
    }

    pub fn load(path: &Path) -> Result<SigningKey, BundleError> {
        let text = std::fs::read_to_string(path).map_err(|source| BundleError::Read {
            path: path.to_owned(),
            source,
        })?;
        SigningKey::from_pem(&text).map_err(|source| BundleError::BadKey {
            path: path.to_owned(),
            source,
        })
    }

    pub fn public(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.0.public_key().as_ref());
        PublicKey(k)
    }

    /// Signs encoded bundle content (under [`SIGNATURE_CONTEXT`]).
    pub fn sign(&self, content: &[u8]) -> Vec<u8> {
        self.0.sign(&signed_message(content)).as_ref().to_vec()
    }
}

/// What a bundle signature is made over comes after this: a signature over the same bytes for
/// any other purpose is not a bundle signature.
pub const SIGNATURE_CONTEXT: &[u8] = b"vedette rule bundle v1\0";

fn signed_message(content: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + content.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(content);
    m
}

/// The fleet a CA certificate (PEM) stands for: SHA-256 of its first certificate, hex; the
/// fingerprint agents pin at enrollment.
pub fn fleet_of_ca_pem(pem_text: &str) -> Option<String> {
    pem::parse_many(pem_text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| hex::encode(Sha256::digest(p.contents())))
}

/// Refuses content made for another fleet (`fleet`: the SHA-256 of this fleet's CA
/// certificate, hex).
pub fn check_fleet(content: &BundleContent, fleet: &str) -> Result<(), BundleError> {
    if content.fleet.eq_ignore_ascii_case(fleet) {
        Ok(())
    } else {
        Err(BundleError::OtherFleet {
            bundle: if content.fleet.is_empty() {
                "(none)".into()
            } else {
                content.fleet.clone()
            },
            here: fleet.to_string(),
        })
    }
}

/// SHA-256 of encoded content, hex.
pub fn digest(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

/// Encodes content canonically (sorts the files by path).
pub fn encode(content: &BundleContent) -> Vec<u8> {
    let mut c = content.clone();
    c.files.sort_by(|a, b| a.path.cmp(&b.path));
    c.encode_to_vec()
}

/// Decodes and checks content: size limits, safe unique sorted paths, canonical encoding.
pub fn decode(bytes: &[u8]) -> Result<BundleContent, BundleError> {
    let bad = |m: String| Err(BundleError::Malformed(m));
    if bytes.len() > MAX_CONTENT_BYTES {
        return bad(format!(
            "{} bytes is more than the {MAX_CONTENT_BYTES}-byte limit",
            bytes.len()
        ));
    }
    let c = BundleContent::decode(bytes).map_err(|e| BundleError::Malformed(e.to_string()))?;
    if c.name.len() > MAX_NAME || c.publisher.len() > MAX_NAME {
        return bad(format!("name or publisher longer than {MAX_NAME} bytes"));
    }
    if c.version == 0 {
        return bad("version 0".into());
    }
    if c.files.len() > MAX_FILES {
        return bad(format!("{} files (at most {MAX_FILES})", c.files.len()));
    }
    for f in &c.files {
        check_path(&f.path).map_err(|e| BundleError::Malformed(e.to_string()))?;
    }
    if c.files.windows(2).any(|w| w[0].path >= w[1].path) {
        return bad("files not sorted by path, or a path given twice".into());
    }
    if c.encode_to_vec() != bytes {
        return bad("not canonically encoded".into());
    }
    Ok(c)
}

/// A bundle path: relative, `/`-separated, no `.`/`..`, printable, a known kind of file.
fn check_path(p: &str) -> Result<(), BadPath> {
    let clip = || p.chars().take(MAX_PATH).collect::<String>();
    if p.is_empty() || p.len() > MAX_PATH {
        return Err(BadPath::Length(clip()));
    }
    if p.starts_with('/')
        || p.contains('\\')
        || p.chars().any(char::is_control)
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(BadPath::NotClean(clip()));
    }
    let path = Path::new(p);
    if !is_settings_file(p) && !is_yara_file(path) && IocKind::of_path(path).is_none() {
        return Err(BadPath::UnknownKind(clip()));
    }
    Ok(())
}

/// The bundle files that are not rules: exceptions and the settings of built-in findings.
fn is_settings_file(path: &str) -> bool {
    path == crate::exceptions::FILE || path == crate::findings::FILE
}

/// Why a name cannot be a bundle file's path.
#[derive(Debug, thiserror::Error)]
pub enum BadPath {
    #[error("file path `{0}`: empty or longer than {MAX_PATH} bytes")]
    Length(String),
    #[error("file path `{0}` is not a clean relative path")]
    NotClean(String),
    #[error(
        "file `{0}` is neither a YARA file (.yar, .yara), an indicator list (a name containing hash, filename, c2, process or cmdline) nor findings.jsonl"
    )]
    UnknownKind(String),
}

/// Checks the signature against the trusted keys. `allow_unsigned` accepts a bundle with no
/// signature at all (an insecure setting); a present signature is always checked.
pub fn verify(
    content: &[u8],
    signature: &[u8],
    signer_key: &[u8],
    trusted: &[PublicKey],
    allow_unsigned: bool,
) -> Result<Option<PublicKey>, BundleError> {
    if signature.is_empty() && signer_key.is_empty() {
        return if allow_unsigned {
            Ok(None)
        } else {
            Err(BundleError::Unsigned)
        };
    }
    let key = PublicKey::from_bytes(signer_key)
        .ok_or_else(|| BundleError::Malformed("signer key is not 32 bytes".into()))?;
    if !trusted.contains(&key) {
        return Err(BundleError::UntrustedSigner(key.id()));
    }
    UnparsedPublicKey::new(&ED25519, key.0)
        .verify(&signed_message(content), signature)
        .map_err(|_| BundleError::BadSignature)?;
    Ok(Some(key))
}

/// Reads files and directories (recursively, every YARA file and indicator list) into bundle
/// files. A file given directly is named by its file name; files under a directory by their
/// path relative to it.
pub fn files_from_paths(paths: &[PathBuf]) -> Result<Vec<BundleFile>, BundleError> {
    let mut out: Vec<BundleFile> = Vec::new();
    for p in paths {
        let read_err = |source| BundleError::Read {
            path: p.clone(),
            source,
        };
        let meta = std::fs::metadata(p).map_err(read_err)?;
        let files = if meta.is_dir() {
            let mut files =
                rule_files_under(p).map_err(|e| BundleError::Malformed(e.to_string()))?;
            let settings = p.join(crate::findings::FILE);
            if settings.is_file() {
                files.push(settings);
            }
            files
        } else {
            vec![p.clone()]
        };
        for f in files {
            let rel = if meta.is_dir() {
                f.strip_prefix(p).unwrap_or(&f).to_owned()
            } else {
                PathBuf::from(f.file_name().unwrap_or(f.as_os_str()))
            };
            let name: Vec<String> = rel
                .components()
                .filter_map(|c| match c {
                    Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            let name = name.join("/");
            check_path(&name)
                .map_err(|reason| BundleError::Malformed(format!("{}: {reason}", f.display())))?;
            if out.iter().any(|x| x.path == name) {
                return Err(BundleError::Malformed(format!(
                    "two files would be named `{name}` in the bundle (rename one)"
                )));
            }
            let data = std::fs::read(&f).map_err(|source| BundleError::Read {
                path: f.clone(),
                source,
            })?;
            out.push(BundleFile { path: name, data });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Adds every file of a bundle to a builder, named `bundle:<path>`.
pub fn add_to(builder: &mut RuleSetBuilder, content: &BundleContent) {
    // Exceptions and findings settings are not rules: the agent reads them apart
    // (`exceptions_of`, `findings_of`).
    for f in content.files.iter().filter(|f| !is_settings_file(&f.path)) {
        let name = PathBuf::from(format!("{ORIGIN_PREFIX}{}", f.path));
        builder.add_source(Origin::Bundle, &name, &f.data);
    }
}

/// Compiles a bundle on its own (its YARA rules through the compiler
/// [`crate::isolated::compile_outside_rules_with`] set, if any). Every YARA problem and every
/// indicator over the rule set's budgets, and with `strict` every indicator problem, is
/// returned as an error; without `strict` other indicator problems come back as warnings.
pub fn validate(
    content: &BundleContent,
    strict: bool,
) -> Result<(RuleSet, Vec<Problem>), Vec<Problem>> {
    let mut b = RuleSetBuilder::new();
    add_to(&mut b, content);
    // Checking needs no set per file class: their problems are the whole set's.
    b = b.whole();
    if let Some(c) = crate::isolated::outside() {
        b = b.compile_with(c);
    }
    let set = b.build(content.version);
    let exceptions = content
        .files
        .iter()
        .filter(|f| is_settings_file(&f.path))
        .filter_map(|f| settings_problem(&f.path, &f.data));
    let (fatal, warnings): (Vec<Problem>, Vec<Problem>) = set
        .report()
        .problems
        .iter()
        .cloned()
        .chain(exceptions)
        .partition(|p| strict || p.kind != ProblemKind::Indicator);
    if fatal.is_empty() {
        Ok((set, warnings))
    } else {
        Err(fatal)
    }
}

/// What is wrong with a bundle's exceptions or findings settings file, if anything.
fn settings_problem(path: &str, data: &[u8]) -> Option<Problem> {
    let findings = path == crate::findings::FILE;
    let reason = match std::str::from_utf8(data) {
        Ok(text) if findings => crate::findings::Findings::parse(text).err()?.to_string(),
        Ok(text) => crate::exceptions::Exceptions::parse(text)
            .err()?
            .to_string(),
        Err(_) => "not UTF-8".to_string(),
    };
    Some(Problem {
        path: PathBuf::from(format!("{ORIGIN_PREFIX}{path}")),
        line: None,
        reason,
        kind: if findings {
            ProblemKind::Findings
        } else {
            ProblemKind::Exceptions
        },
        origin: Origin::Bundle,
    })
}

/// The settings of built-in findings a bundle carries (none when it has no such file or it
/// does not parse, which publishing refuses).
pub fn findings_of(content: &BundleContent) -> crate::findings::Findings {
    settings_text(content, crate::findings::FILE)
        .and_then(|text| crate::findings::Findings::parse(text).ok())
        .unwrap_or_default()
}

/// The text of a bundle's settings file at `path`, if it has one in UTF-8.
fn settings_text<'a>(content: &'a BundleContent, path: &str) -> Option<&'a str> {
    let file = content.files.iter().find(|f| f.path == path)?;
    std::str::from_utf8(&file.data).ok()
}

/// The exceptions a bundle carries (none when it has no exceptions file or it does not
/// parse, which publishing refuses).
pub fn exceptions_of(content: &BundleContent) -> crate::exceptions::Exceptions {
    settings_text(content, crate::exceptions::FILE)
        .and_then(|text| crate::exceptions::Exceptions::parse(text).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content() -> BundleContent {
        BundleContent {
            name: "fleet".into(),
            version: 3,
            created_at_ms: 1,
            publisher: "alice".into(),
            files: vec![
                BundleFile {
                    path: "b/x.yar".into(),
                    data: b"rule x { condition: true }".to_vec(),
                },
                BundleFile {
                    path: "a-hash-iocs.txt".into(),
                    data: b"d41d8cd98f00b204e9800998ecf8427e;empty\n".to_vec(),
                },
            ],
            fleet: String::new(),
        }
    }

    #[test]
    fn a_bundle_over_the_regex_budget_is_refused_naming_the_indicator_even_when_not_strict() {
        let lines: Vec<String> = (0..9)
            .map(|i| {
                serde_json::json!({
                    "source": "stix", "id": format!("indicator--re-{i}"), "origin": "feed",
                    "pattern_type": "stix",
                    "pattern": "[process:command_line MATCHES '\\\\w{100}x']",
                })
                .to_string()
            })
            .collect();
        let mut c = content();
        c.files.push(BundleFile {
            path: "intel/indicators.jsonl".into(),
            data: lines.join("\n").into_bytes(),
        });
        let problems = validate(&c, false).err().expect("refused");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.starts_with("indicator--re-8: "),
            "{problems:?}"
        );
        // Within the budget it is published.
        c.files.last_mut().unwrap().data = lines[..8].join("\n").into_bytes();
        assert!(validate(&c, false).is_ok());
    }

    #[test]
    fn a_bundle_for_another_fleet_is_refused() {
        let mut c = content();
        c.fleet = "ab".repeat(32);
        assert!(check_fleet(&c, &"AB".repeat(32)).is_ok());
        let e = check_fleet(&c, &"cd".repeat(32)).unwrap_err().to_string();
        assert!(
            e.contains(&"ab".repeat(32)) && e.contains(&"cd".repeat(32)),
            "{e}"
        );
        c.fleet.clear();
        assert!(check_fleet(&c, &"cd".repeat(32)).is_err());
    }

    #[test]
    fn signed_content_verifies_and_any_change_breaks_it() {
        let (pem, public) = SigningKey::generate().unwrap();
        let key = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.public(), public);
        let bytes = encode(&content());
        let sig = key.sign(&bytes);
        let got = verify(&bytes, &sig, &public.0, &[public], false).unwrap();
        assert_eq!(got, Some(public));
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.files[0].path, "a-hash-iocs.txt", "files are sorted");

        let mut altered = bytes.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(matches!(
            verify(&altered, &sig, &public.0, &[public], false),
            Err(BundleError::BadSignature)
        ));
        let (_, other) = SigningKey::generate().unwrap();
        assert!(matches!(
            verify(&bytes, &sig, &public.0, &[other], false),
            Err(BundleError::UntrustedSigner(_))
        ));
        assert!(matches!(
            verify(&bytes, &[], &[], &[public], false),
            Err(BundleError::Unsigned)
        ));
        // A signature over the bare content (no bundle context) is not a bundle signature.
        let bare = key.0.sign(&bytes).as_ref().to_vec();
        assert!(matches!(
            verify(&bytes, &bare, &public.0, &[public], false),
            Err(BundleError::BadSignature)
        ));
        assert!(verify(&bytes, &[], &[], &[public], true).unwrap().is_none());
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let (_, public) = SigningKey::generate().unwrap();
        let pem = public.to_pem();
        assert!(pem.contains("BEGIN PUBLIC KEY"));
        assert_eq!(PublicKey::parse_pem(&pem).unwrap(), vec![public]);
        assert!(PublicKey::parse_pem("junk").is_err());
    }

    #[test]
    fn unsafe_paths_and_non_canonical_bytes_are_refused() {
        for p in [
            "../x.yar",
            "/etc/x.yar",
            "a//x.yar",
            "a/./x.yar",
            "notes.md",
        ] {
            let mut c = content();
            c.files = vec![BundleFile {
                path: p.into(),
                data: vec![],
            }];
            assert!(decode(&c.encode_to_vec()).is_err(), "{p}");
        }
        // Unsorted files: valid protobuf, not canonical.
        let c = content();
        assert!(decode(&c.encode_to_vec()).is_err());
        assert!(decode(&encode(&c)).is_ok());
    }

    #[test]
    fn validation_names_the_file_and_line() {
        let mut c = content();
        c.files.push(BundleFile {
            path: "c/broken.yar".into(),
            data: b"rule ok { condition: true }\n\nrule broken { condition: nope }\n".to_vec(),
        });
        let errs = validate(&c, false).err().unwrap();
        let text = errs[0].to_string();
        assert!(text.starts_with("bundle:c/broken.yar:3:"), "{text}");
    }
}
