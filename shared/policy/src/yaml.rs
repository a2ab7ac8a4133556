//! Reading Kubernetes YAML: multi-document files into JSON values, and the
//! YAML line where a template's Rego source starts (for error messages).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;

use crate::error::{Place, PolicyError};

/// Reads a file to a string, naming it on failure.
pub(crate) fn read_file(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::ReadFile {
        path: path.display().to_string(),
        source,
    })
}

/// Parses every document of a (possibly multi-document) YAML text. Empty
/// documents (a lone `---`, comments only) are skipped, as kubectl does.
pub(crate) fn parse_docs(file: &str, text: &str) -> Result<Vec<Value>, PolicyError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        let line = e.location().and_then(|l| u32::try_from(l.line()).ok());
        PolicyError::ParseYaml {
            place: Place::at(file, line),
            // The parser names the input `<input>`; name the real file instead.
            message: e.to_string().replace("<input>", file),
        }
    })?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Which Rego text of a template a line is wanted for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RegoPart {
    /// The main module.
    Main,
    /// `libs[i]`.
    Lib(usize),
}

// Only the fields that hold Rego, each with its position. Everything is
// optional so that any Kubernetes document deserializes.
#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanDoc {
    spec: SpanSpec,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanSpec {
    targets: Vec<SpanTarget>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanTarget {
    rego: Option<Spanned<String>>,
    libs: Vec<Spanned<String>>,
    code: Vec<SpanCode>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanCode {
    engine: String,
    source: SpanSource,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct SpanSource {
    rego: Option<Spanned<String>>,
    libs: Vec<Spanned<String>>,
}

/// The YAML line holding line 1 of a template's Rego text (for a block
/// scalar `rego: |`, the first content line), so that a Rego line `n` is
/// YAML line `start + n - 1`. Only computed when reporting an error, so the
/// second parse costs nothing on the happy path. `None` when the document
/// cannot be re-read with positions.
pub(crate) fn rego_start_line(
    text: &str,
    doc_index: usize,
    code_form: bool,
    part: RegoPart,
) -> Option<u32> {
    let docs: Vec<Option<SpanDoc>> = serde_saphyr::from_multiple(text).ok()?;
    let docs: Vec<SpanDoc> = docs.into_iter().flatten().collect();
    let target = docs.get(doc_index)?.spec.targets.first()?;
    let (rego, libs) = if code_form {
        let code = target.code.iter().find(|c| c.engine == "Rego")?;
        (code.source.rego.as_ref(), &code.source.libs)
    } else {
        (target.rego.as_ref(), &target.libs)
    };
    let spanned = match part {
        RegoPart::Main => rego?,
        RegoPart::Lib(i) => libs.get(i)?,
    };
    u32::try_from(spanned.referenced.line()).ok()
}

/// `apiVersion` split into group and version (`v1` → `("", "v1")`).
pub(crate) fn group_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version),
    }
}

/// A string field at a path, or `""`.
pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        match v.get(key) {
            Some(next) => v = next,
            None => return "",
        }
    }
    v.as_str().unwrap_or("")
}
