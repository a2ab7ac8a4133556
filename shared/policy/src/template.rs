//! ConstraintTemplates: reading the Rego out of a template document and
//! rewriting its packages so that every template lives in its own namespace
//! inside one shared regorus engine.
//!
//! Gatekeeper compiles each template in isolation: its package is renamed to
//! `templates["admission.k8s.gatekeeper.sh"][Kind]` and its `libs` (which must
//! be `package lib.*`) are moved under a per-template prefix, with every
//! `data.lib` reference rewritten to match. Two templates may therefore both
//! ship `package lib.exclude_update` (the gatekeeper-library does exactly
//! that). We do the same rewrite on the source text, token-aware (strings and
//! comments are left alone), so lines and columns stay where the author put
//! them and regorus' error positions remain true.
//!
//! `data.inventory` is rewritten to `input.inventory`: see [`INVENTORY_REF`].

use serde_json::Value;

use crate::error::{Place, PolicyError};
use crate::yaml::{RegoPart, str_at};

/// Root of the renamed template packages: `data.gantry_templates.<Kind>`.
pub(crate) const TEMPLATES_ROOT: &str = "gantry_templates";
/// Root of the renamed lib packages: `data.gantry_libs.<Kind>.lib...`.
pub(crate) const LIBS_ROOT: &str = "gantry_libs";

/// Where templates find `data.inventory` after the rewrite.
pub(crate) const INVENTORY_REF: &str = "input.inventory";

/// The Gatekeeper target gantry evaluates.
const ADMISSION_TARGET: &str = "admission.k8s.gatekeeper.sh";

/// A template as read from YAML, before compilation.
#[derive(Debug, Clone)]
pub(crate) struct TemplateSource {
    /// `metadata.name`.
    pub name: String,
    /// `spec.crd.spec.names.kind`: the kind of its constraints.
    pub kind: String,
    /// The main Rego module.
    pub rego: String,
    /// Extra modules (`package lib.*`).
    pub libs: Vec<String>,
    /// `source.version: v1` in the `code` form selects Rego v1 syntax.
    pub rego_v1: bool,
    /// Whether the Rego came from `code: [{engine: Rego}]` (for error lines).
    pub code_form: bool,
    /// `spec.crd.spec.validation.openAPIV3Schema`, checked against constraint parameters.
    pub schema: Option<Value>,
}

/// Whether a document is a ConstraintTemplate.
pub(crate) fn is_template(doc: &Value) -> bool {
    str_at(doc, &["kind"]) == "ConstraintTemplate"
        && str_at(doc, &["apiVersion"]).starts_with("templates.gatekeeper.sh/")
}

impl TemplateSource {
    /// Reads the parts gantry needs from a ConstraintTemplate document.
    pub(crate) fn from_doc(place: &Place, doc: &Value) -> Result<Self, PolicyError> {
        let name = str_at(doc, &["metadata", "name"]).to_string();
        let fail = |message: String| PolicyError::LoadTemplate {
            place: place.clone(),
            template: if name.is_empty() {
                "?".to_string()
            } else {
                name.clone()
            },
            message,
        };
        if name.is_empty() {
            return Err(fail("metadata.name is missing".into()));
        }
        let kind = str_at(doc, &["spec", "crd", "spec", "names", "kind"]).to_string();
        if kind.is_empty() {
            return Err(fail("spec.crd.spec.names.kind is missing".into()));
        }
        // The kind becomes a Rego package segment and a Kubernetes kind: keep
        // it to what both accept.
        let valid_kind = kind.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && kind.chars().all(|c| c.is_ascii_alphanumeric());
        if !valid_kind {
            return Err(fail(format!(
                "spec.crd.spec.names.kind {kind:?} must be alphanumeric and start with a letter"
            )));
        }
        let targets = doc
            .pointer("/spec/targets")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("spec.targets is missing".into()))?;
        // Gatekeeper supports exactly one target per template; prefer the
        // admission target if several are listed.
        let target = targets
            .iter()
            .find(|t| str_at(t, &["target"]) == ADMISSION_TARGET)
            .or_else(|| targets.first())
            .ok_or_else(|| fail("spec.targets is empty".into()))?;

        // Newer templates put Rego under `code` (beside CEL); the legacy
        // `rego` field is used when no Rego engine is listed there.
        let code_rego = target
            .get("code")
            .and_then(Value::as_array)
            .and_then(|code| code.iter().find(|c| str_at(c, &["engine"]) == "Rego"));
        let (source, code_form) = match code_rego {
            Some(code) => (code.get("source").unwrap_or(&Value::Null), true),
            None => (target, false),
        };
        let rego = str_at(source, &["rego"]).to_string();
        if rego.trim().is_empty() {
            let cel_only = target.get("code").is_some();
            return Err(fail(if cel_only {
                "the template has no Rego source (CEL / K8sNativeValidation is not supported)"
                    .into()
            } else {
                "spec.targets[0].rego is missing".into()
            }));
        }
        let libs = match source.get("libs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(libs)) => libs
                .iter()
                .enumerate()
                .map(|(i, lib)| {
                    lib.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| fail(format!("libs[{i}] is not a string")))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(fail("libs must be a list of Rego sources".into())),
        };
        let rego_v1 = code_form && str_at(source, &["version"]) == "v1";
        let schema = doc
            .pointer("/spec/crd/spec/validation/openAPIV3Schema")
            .cloned();
        Ok(Self {
            name,
            kind,
            rego,
            libs,
            rego_v1,
            code_form,
            schema,
        })
    }

    /// The rule gantry queries for this template's violations.
    pub(crate) fn query(&self) -> String {
        format!("data.{TEMPLATES_ROOT}.{}.violation", self.kind)
    }

    /// The modules to load, renamed into this template's namespace, each with
    /// the source path regorus reports in errors and which part it is.
    pub(crate) fn rewritten_modules(&self, file: &str) -> Result<Vec<Module>, (RegoPart, String)> {
        let mut modules = Vec::with_capacity(1 + self.libs.len());
        let main = rewrite(&self.rego, &self.kind, Role::Main).map_err(|e| (RegoPart::Main, e))?;
        modules.push(Module {
            path: format!("{file}#{}/rego", self.name),
            rego: main,
            part: RegoPart::Main,
        });
        for (i, lib) in self.libs.iter().enumerate() {
            let part = RegoPart::Lib(i);
            modules.push(Module {
                path: format!("{file}#{}/libs[{i}]", self.name),
                rego: rewrite(lib, &self.kind, Role::Lib).map_err(|e| (part, e))?,
                part,
            });
        }
        Ok(modules)
    }
}

/// One rewritten Rego module, ready for `Engine::add_policy`.
pub(crate) struct Module {
    /// The source path regorus reports: `file#template/rego` or `.../libs[i]`.
    pub path: String,
    /// The rewritten source.
    pub rego: String,
    /// Which part of the template it is.
    pub part: RegoPart,
}

/// Which module of a template is being rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The template's own package: renamed to `gantry_templates.<Kind>`.
    Main,
    /// A lib: `package lib.x` becomes `gantry_libs.<Kind>.lib.x`.
    Lib,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Byte ranges of the identifiers of a Rego source, skipping strings, raw
/// strings and comments (a tiny lexer: all the rewrite needs).
fn identifiers(src: &str) -> Vec<(usize, usize)> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' && bytes[i] != b'\n' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
                    i += 1;
                }
                i += 1;
            }
            _ if is_ident_start(c) => {
                let start = i;
                while i < bytes.len() && is_ident_char(bytes[i]) {
                    i += 1;
                }
                out.push((start, i));
            }
            // Numbers (and anything else): skip the whole alphanumeric run so
            // that `1e5` does not yield an identifier `e5`.
            _ if c.is_ascii_digit() => {
                while i < bytes.len() && (is_ident_char(bytes[i]) || bytes[i] == b'.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Renames the package and every `data.lib` reference of one module.
pub(crate) fn rewrite(src: &str, kind: &str, role: Role) -> Result<String, String> {
    let idents = identifiers(src);
    let mut edits: Vec<(usize, usize, String)> = Vec::new();

    let package = idents
        .iter()
        .find(|&&(s, e)| &src[s..e] == "package")
        .ok_or_else(|| "no package declaration".to_string())?;
    // The package path runs to the end of the line (or a trailing comment).
    let path_start = package.1
        + src[package.1..]
            .bytes()
            .take_while(|b| *b == b' ' || *b == b'\t')
            .count();
    let line_end = src[path_start..]
        .find(['\n', '#'])
        .map_or(src.len(), |n| path_start + n);
    let path = src[path_start..line_end].trim_end();
    let path_end = path_start + path.len();
    if path.is_empty() {
        return Err("package declaration without a path".into());
    }
    match role {
        Role::Main => edits.push((path_start, path_end, format!("{TEMPLATES_ROOT}.{kind}"))),
        Role::Lib => {
            let is_lib = path == "lib" || path.starts_with("lib.") || path.starts_with("lib[");
            if !is_lib {
                return Err(format!(
                    "lib package {path:?} must start with `lib.` (Gatekeeper rule)"
                ));
            }
            edits.push((path_start, path_start, format!("{LIBS_ROOT}.{kind}.")));
        }
    }

    for &(s, e) in &idents {
        if &src[s..e] != "data" || (path_start..path_end).contains(&s) {
            continue;
        }
        // `x.data.lib` is a field access, not the data document.
        let before = src[..s].trim_end();
        if before.ends_with('.') {
            continue;
        }
        let rest = &src[e..];
        let followed_by = |segment: &str| {
            rest.starts_with(segment)
                && rest
                    .as_bytes()
                    .get(segment.len())
                    .is_none_or(|&c| !is_ident_char(c))
        };
        if followed_by(".lib") {
            edits.push((e, e, format!(".{LIBS_ROOT}.{kind}")));
        } else if followed_by(".inventory") {
            // The inventory travels in the input: new data would make regorus
            // re-analyse every module on each evaluation (about 1 ms for the
            // built-ins), new input costs nothing.
            edits.push((s, e + ".inventory".len(), INVENTORY_REF.to_string()));
        }
    }

    edits.sort_by_key(|(s, _, _)| *s);
    let mut out = String::with_capacity(src.len() + edits.len() * 32);
    let mut at = 0;
    for (s, e, text) in edits {
        out.push_str(&src[at..s]);
        out.push_str(&text);
        at = e;
    }
    out.push_str(&src[at..]);
    Ok(out)
}

/// Finds regorus' `--> path:line:col` pointer in an error message.
pub(crate) fn error_position(message: &str) -> Option<(String, u32)> {
    let pointer = message
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "))?;
    let mut parts = pointer.trim().rsplitn(3, ':');
    let _col = parts.next()?;
    let line = parts.next()?.parse().ok()?;
    let path = parts.next()?.to_string();
    Some((path, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_package_and_lib_references_but_not_strings_or_comments() {
        let src = "package k8sfoo # main\n\nimport data.lib.helpers.ok\n\
                   # data.lib.in_comment\nviolation[{\"msg\": m}] {\n  x := data.lib.helpers.y\n  \
                   m := \"data.lib.string\"\n  z := input.data.lib\n  w := data.library\n  \
                   i := data.inventory.cluster[\"v1\"]\n}\n";
        let out = rewrite(src, "K8sFoo", Role::Main).unwrap();
        assert!(out.starts_with("package gantry_templates.K8sFoo # main\n"));
        assert!(out.contains("import data.gantry_libs.K8sFoo.lib.helpers.ok\n"));
        assert!(out.contains("# data.lib.in_comment"));
        assert!(out.contains("x := data.gantry_libs.K8sFoo.lib.helpers.y"));
        assert!(out.contains("\"data.lib.string\""));
        assert!(out.contains("input.data.lib"));
        assert!(out.contains("data.library"));
        assert!(out.contains("i := input.inventory.cluster[\"v1\"]"));
        assert_eq!(src.lines().count(), out.lines().count());
    }

    #[test]
    fn lib_packages_get_a_prefix_and_must_start_with_lib() {
        let out = rewrite("package lib.helpers\nok { true }\n", "K", Role::Lib).unwrap();
        assert!(out.starts_with("package gantry_libs.K.lib.helpers\n"));
        let err = rewrite("package helpers\n", "K", Role::Lib).unwrap_err();
        assert!(err.contains("must start with `lib.`"), "{err}");
        assert!(rewrite("# nothing\n", "K", Role::Main).is_err());
    }

    #[test]
    fn finds_regorus_error_positions() {
        let msg = "\n--> a/b.yaml#t/rego:3:23\n  |\nerror: expecting }";
        assert_eq!(error_position(msg), Some(("a/b.yaml#t/rego".into(), 3)));
        assert_eq!(error_position("no pointer"), None);
    }
}
