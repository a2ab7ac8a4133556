//! gantry's own policies, embedded from `/policies` at build time.
//!
//! Each lives in `policies/<name>/` in the gatekeeper-library layout
//! (`template.yaml`, `suite.yaml`, `samples/<name>/constraint.yaml` and
//! examples). The embedded constraint is the very file the suite tests, so
//! what `PolicySet::builtin()` enforces is what `run_suites("policies")`
//! proves.

/// One built-in policy: its template and the constraint gantry applies.
pub(crate) struct Builtin {
    /// Folder name under `policies/`.
    pub name: &'static str,
    /// `template.yaml`.
    pub template: &'static str,
    /// `samples/<name>/constraint.yaml`.
    pub constraint: &'static str,
}

impl Builtin {
    /// How errors name the template file.
    pub(crate) fn template_file(&self) -> String {
        format!("policies/{}/template.yaml", self.name)
    }

    /// How errors name the constraint file.
    pub(crate) fn constraint_file(&self) -> String {
        format!("policies/{0}/samples/{0}/constraint.yaml", self.name)
    }
}

macro_rules! builtin {
    ($name:literal) => {
        Builtin {
            name: $name,
            template: include_str!(concat!("../../../policies/", $name, "/template.yaml")),
            constraint: include_str!(concat!(
                "../../../policies/",
                $name,
                "/samples/",
                $name,
                "/constraint.yaml"
            )),
        }
    };
}

/// Every built-in, in the order they are evaluated.
pub(crate) const BUILTINS: &[Builtin] = &[
    builtin!("image-digest"),
    builtin!("image-tag"),
    builtin!("container-hardening"),
    builtin!("seccomp"),
    builtin!("resources"),
    builtin!("host-namespaces"),
    builtin!("probes"),
    builtin!("automount-token"),
    builtin!("namespace-psa"),
    builtin!("public-lb"),
    builtin!("secret-env"),
    builtin!("pipeline-secret"),
    builtin!("egress"),
];
