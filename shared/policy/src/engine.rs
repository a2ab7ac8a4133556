//! Building the one regorus engine of a policy set: templates in, renamed,
//! compiled and prepared once; constraints resolved against them.

use std::collections::HashMap;

use regorus::Engine;
use serde_json::Value;

use crate::constraint::{Constraint, is_constraint};
use crate::error::{Place, PolicyError};
use crate::template::{TemplateSource, error_position, is_template};
use crate::yaml::{RegoPart, rego_start_line};

/// A compiled template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub name: String,
    pub place: Place,
    /// `data.gantry_templates.<Kind>.violation`.
    pub query: String,
    pub schema: Option<Value>,
}

/// An engine configured the way Gatekeeper's Rego driver behaves.
pub(crate) fn new_engine() -> Engine {
    let mut engine = Engine::new();
    // The gatekeeper-library and most templates in the wild are Rego v0.
    engine.set_rego_v0(true);
    // OPA returns undefined from a failing builtin (e.g. a bad regex); a
    // policy written for OPA relies on that.
    engine.set_strict_builtin_errors(false);
    add_extensions(&mut engine);
    engine
}

/// Deprecated OPA builtins regorus lacks but older templates still call
/// (the gatekeeper-library's `requiredlabels` and `uniqueingresshost` use
/// `re_match`). Registering cannot fail on a fresh engine; a failure would
/// only mean the name is already taken, which is harmless.
fn add_extensions(engine: &mut Engine) {
    let mut cache: HashMap<String, regex::Regex> = HashMap::new();
    let _ = engine.add_extension(
        "re_match".into(),
        2,
        Box::new(
            move |params: Vec<regorus::Value>| -> anyhow::Result<regorus::Value> {
                let (Ok(pattern), Ok(value)) = (params[0].as_string(), params[1].as_string())
                else {
                    return Ok(regorus::Value::Undefined);
                };
                if !cache.contains_key(pattern.as_ref()) {
                    let Ok(re) = regex::Regex::new(pattern) else {
                        return Ok(regorus::Value::Undefined);
                    };
                    // Patterns come from policies, not objects: the cache stays
                    // small, but keep it bounded anyway.
                    if cache.len() >= 256 {
                        cache.clear();
                    }
                    cache.insert(pattern.to_string(), re);
                }
                let matched = cache
                    .get(pattern.as_ref())
                    .is_some_and(|re| re.is_match(value));
                Ok(regorus::Value::from(matched))
            },
        ),
    );
    for (name, want_all) in [("any", false), ("all", true)] {
        let _ = engine.add_extension(
            name.into(),
            1,
            Box::new(
                move |params: Vec<regorus::Value>| -> anyhow::Result<regorus::Value> {
                    let items: Vec<&regorus::Value> = match &params[0] {
                        regorus::Value::Array(a) => a.iter().collect(),
                        regorus::Value::Set(s) => s.iter().collect(),
                        _ => return Ok(regorus::Value::Undefined),
                    };
                    let t = regorus::Value::from(true);
                    let result = if want_all {
                        items.iter().all(|v| **v == t)
                    } else {
                        items.iter().any(|v| **v == t)
                    };
                    Ok(regorus::Value::from(result))
                },
            ),
        );
    }
}

/// Where each loaded module came from, to turn regorus' positions back into
/// YAML file lines.
#[derive(Clone)]
struct ModuleOrigin {
    template: usize,
    part: RegoPart,
    /// The YAML text and document index, to find lines lazily.
    text: std::sync::Arc<str>,
    doc_index: usize,
    code_form: bool,
}

/// Loaded modules by the source path regorus reports (`file#template/rego`).
#[derive(Clone, Default)]
pub(crate) struct Origins(HashMap<String, ModuleOrigin>);

/// What [`Origins::locate`] found out about an error message.
pub(crate) struct Located {
    /// File and YAML line, when the message points into a known module.
    pub place: Option<Place>,
    /// Index of the template the module belongs to.
    pub template: Option<usize>,
    /// Line within the Rego source.
    pub rego_line: Option<u32>,
}

impl Origins {
    /// Reads regorus' `--> path:line:col` pointer and maps it back to the
    /// YAML file and line the module came from.
    pub(crate) fn locate(&self, message: &str) -> Located {
        let Some((path, rego_line)) = error_position(message) else {
            return Located {
                place: None,
                template: None,
                rego_line: None,
            };
        };
        let Some(o) = self.0.get(&path) else {
            return Located {
                place: None,
                template: None,
                rego_line: Some(rego_line),
            };
        };
        let file = path.split_once('#').map_or(path.as_str(), |(f, _)| f);
        let line = rego_start_line(&o.text, o.doc_index, o.code_form, o.part)
            .map(|start| start + rego_line.saturating_sub(1));
        Located {
            place: Some(Place::at(file, line)),
            template: Some(o.template),
            rego_line: Some(rego_line),
        }
    }
}

/// Accumulates templates and constraints, then yields the prepared engine.
pub(crate) struct Builder {
    engine: Engine,
    templates: Vec<Template>,
    by_kind: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    origins: Origins,
    constraints: Vec<Constraint>,
    constraint_names: HashMap<(String, String), Place>,
}

/// A parsed YAML file, remembered so constraints are added after all templates.
pub(crate) struct ParsedFile {
    pub file: String,
    pub text: std::sync::Arc<str>,
    pub docs: Vec<Value>,
}

impl Builder {
    pub(crate) fn new() -> Self {
        Self {
            engine: new_engine(),
            templates: Vec::new(),
            by_kind: HashMap::new(),
            by_name: HashMap::new(),
            origins: Origins::default(),
            constraints: Vec::new(),
            constraint_names: HashMap::new(),
        }
    }

    /// Adds every template, then every constraint, of the given files (so a
    /// constraint may come before its template in folder order). Other
    /// documents are skipped.
    pub(crate) fn add_files(&mut self, files: &[ParsedFile]) -> Result<(), PolicyError> {
        for f in files {
            for (i, doc) in f.docs.iter().enumerate() {
                if is_template(doc) {
                    self.add_template(&f.file, &f.text, i, doc)?;
                }
            }
        }
        for f in files {
            for doc in &f.docs {
                if is_constraint(doc) {
                    self.add_constraint(&f.file, doc)?;
                }
            }
        }
        Ok(())
    }

    /// Compiles one ConstraintTemplate document into the engine.
    pub(crate) fn add_template(
        &mut self,
        file: &str,
        text: &std::sync::Arc<str>,
        doc_index: usize,
        doc: &Value,
    ) -> Result<usize, PolicyError> {
        let place = Place::file(file);
        let source = TemplateSource::from_doc(&place, doc)?;
        let index = self.templates.len();
        let dup = |other: &Template, what: &str| PolicyError::LoadTemplate {
            place: place.clone(),
            template: source.name.clone(),
            message: format!(
                "{what} is already defined by template {} in {}",
                other.name, other.place
            ),
        };
        if let Some(&other) = self.by_kind.get(&source.kind) {
            return Err(dup(
                &self.templates[other],
                &format!("kind {}", source.kind),
            ));
        }
        if let Some(&other) = self.by_name.get(&source.name) {
            return Err(dup(
                &self.templates[other],
                &format!("template name {}", source.name),
            ));
        }
        let origin = |part| ModuleOrigin {
            template: index,
            part,
            text: text.clone(),
            doc_index,
            code_form: source.code_form,
        };
        let modules = source.rewritten_modules(file).map_err(|(part, message)| {
            let line = rego_start_line(text, doc_index, source.code_form, part);
            PolicyError::CompileRego {
                place: Place::at(file, line),
                template: source.name.clone(),
                rego_line: None,
                message,
            }
        })?;
        self.engine.set_rego_v0(!source.rego_v1);
        for module in modules {
            self.origins
                .0
                .insert(module.path.clone(), origin(module.part));
            if let Err(e) = self.engine.add_policy(module.path, module.rego) {
                self.engine.set_rego_v0(true);
                return Err(self.compile_error(&source.name, file, &e.to_string()));
            }
        }
        self.engine.set_rego_v0(true);
        self.by_kind.insert(source.kind.clone(), index);
        self.by_name.insert(source.name.clone(), index);
        self.templates.push(Template {
            query: source.query(),
            name: source.name,
            place,
            schema: source.schema,
        });
        Ok(index)
    }

    /// A regorus error as a `CompileRego` naming the YAML file and line.
    fn compile_error(
        &self,
        fallback_template: &str,
        fallback_file: &str,
        message: &str,
    ) -> PolicyError {
        let located = self.origins.locate(message);
        let template = located.template.map_or_else(
            || fallback_template.to_string(),
            |i| self.template_name(i, fallback_template),
        );
        PolicyError::CompileRego {
            place: located.place.unwrap_or_else(|| Place::file(fallback_file)),
            template,
            rego_line: located.rego_line,
            message: message.trim().to_string(),
        }
    }

    fn template_name(&self, index: usize, fallback: &str) -> String {
        self.templates
            .get(index)
            .map_or_else(|| fallback.to_string(), |t| t.name.clone())
    }

    /// Resolves one Constraint document against the loaded templates.
    pub(crate) fn add_constraint(&mut self, file: &str, doc: &Value) -> Result<(), PolicyError> {
        let place = Place::file(file);
        let templates = &self.templates;
        let by_kind = &self.by_kind;
        let constraint = Constraint::from_doc(&place, doc, |kind| {
            by_kind
                .get(kind)
                .map(|&i| (i, templates[i].schema.as_ref()))
        })?;
        let key = (constraint.kind.clone(), constraint.name.clone());
        if let Some(other) = self.constraint_names.get(&key) {
            return Err(PolicyError::LoadConstraint {
                place,
                kind: constraint.kind,
                constraint: constraint.name,
                message: format!(
                    "a constraint of this kind and name is already defined in {other}"
                ),
            });
        }
        self.constraint_names.insert(key, place);
        self.constraints.push(constraint);
        Ok(())
    }

    /// Prepares the engine once (regorus analyses every module on the first
    /// evaluation), surfacing compile errors now instead of at deploy time.
    pub(crate) fn finish(mut self) -> Result<Prepared, PolicyError> {
        if let Err(e) = self.engine.eval_query("true".into(), false) {
            let message = e.to_string();
            let fallback = self
                .templates
                .first()
                .map_or_else(|| "?".to_string(), |t| t.name.clone());
            let file = self
                .templates
                .first()
                .map_or_else(|| "?".to_string(), |t| t.place.file.clone());
            return Err(self.compile_error(&fallback, &file, &message));
        }
        Ok(Prepared {
            engine: self.engine,
            templates: self.templates,
            constraints: self.constraints,
            origins: self.origins,
        })
    }
}

/// What [`Builder::finish`] yields.
pub(crate) struct Prepared {
    pub engine: Engine,
    pub templates: Vec<Template>,
    pub constraints: Vec<Constraint>,
    pub origins: Origins,
}

/// Bench-only helper, see [`crate::raw_engine_for_bench`].
pub(crate) fn raw_engine(template_yaml: &str) -> Result<(Engine, String), PolicyError> {
    let file = "<bench>";
    let docs = crate::yaml::parse_docs(file, template_yaml)?;
    let doc = docs
        .iter()
        .find(|d| is_template(d))
        .ok_or_else(|| PolicyError::LoadTemplate {
            place: Place::file(file),
            template: "?".into(),
            message: "no ConstraintTemplate document".into(),
        })?;
    let source = TemplateSource::from_doc(&Place::file(file), doc)?;
    let mut engine = new_engine();
    engine.set_rego_v0(!source.rego_v1);
    let fail = |e: anyhow::Error| PolicyError::CompileRego {
        place: Place::file(file),
        template: source.name.clone(),
        rego_line: error_position(&e.to_string()).map(|(_, l)| l),
        message: e.to_string(),
    };
    let package = engine
        .add_policy(format!("{file}#rego"), source.rego.clone())
        .map_err(fail)?;
    for (i, lib) in source.libs.iter().enumerate() {
        engine
            .add_policy(format!("{file}#libs[{i}]"), lib.clone())
            .map_err(fail)?;
    }
    Ok((engine, format!("{package}.violation")))
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    fn eval(rego: &str) -> Value {
        let mut engine = new_engine();
        engine.add_policy("t.rego".into(), rego.into()).unwrap();
        engine.set_input(regorus::Value::new_object());
        serde_json::to_value(engine.eval_rule("data.t.x".into()).unwrap()).unwrap()
    }

    #[test]
    fn deprecated_builtins_are_provided() {
        assert_eq!(
            eval("package t\nx = re_match(\"^a+$\", \"aaa\")\n"),
            json!(true)
        );
        assert_eq!(
            eval("package t\nx = re_match(\"^a+$\", \"ab\")\n"),
            json!(false)
        );
        // A bad pattern is undefined, as in OPA with non-strict builtins.
        assert_eq!(
            eval("package t\nx = true { not re_match(\"(\", \"a\") }\n"),
            json!(true)
        );
        assert_eq!(
            eval("package t\nx = [any([false, true]), all([true, false]), all([])]\n"),
            json!([true, false, true])
        );
        assert_eq!(eval("package t\nx = any({false})\n"), json!(false));
    }

    #[test]
    fn templates_may_still_define_functions_named_like_extensions() {
        let rego = "package t\nall(xs) = \"mine\" { true }\nx = all([false])\n";
        assert_eq!(eval(rego), json!("mine"));
    }
}
