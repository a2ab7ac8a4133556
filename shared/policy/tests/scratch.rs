#![allow(missing_docs)]
use std::time::Instant;
#[test]
fn scratch() {
    let tpl = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../policies/container-hardening/template.yaml"
    ))
    .unwrap();
    let (engine, query) = gantry_policy::raw_engine_for_bench(&tpl).unwrap();
    let obj: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../policies/container-hardening/samples/container-hardening/example_allowed.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    let input = regorus::Value::from(
        serde_json::json!({"review": {"object": obj, "kind": {"kind": "Deployment"}}, "parameters": {}}),
    );
    let mut e = engine.clone();
    e.set_input(input.clone());
    e.eval_rule(query.clone()).unwrap();
    let n = 5000;
    let t = Instant::now();
    for _ in 0..n {
        e.set_input(input.clone());
        e.eval_rule(query.clone()).unwrap();
    }
    println!(
        "raw eval_rule: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        let _c = e.clone();
    }
    println!(
        "clone: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let (engine2, q2) =
        gantry_policy::raw_engine_for_bench(&std::fs::read_to_string("/tmp/ch2.yaml").unwrap())
            .unwrap();
    let mut e2 = engine2.clone();
    e2.set_input(input.clone());
    println!(
        "{}",
        e2.eval_rule(q2.clone()).unwrap().to_json_str().unwrap()
    );
    let t = Instant::now();
    for _ in 0..n {
        e2.set_input(input.clone());
        e2.eval_rule(q2.clone()).unwrap();
    }
    println!(
        "raw eval_rule, rules not functions: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let set = gantry_policy::PolicySet::builtin().unwrap();
    let t = Instant::now();
    for _ in 0..200 {
        let _ = set.evaluate(std::slice::from_ref(&obj), &[]).unwrap();
    }
    println!(
        "builtin evaluate 1 object: {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / 200.0
    );
    let mut bare = obj.clone();
    bare.as_object_mut().unwrap().remove("apiVersion");
    let t = Instant::now();
    for _ in 0..200 {
        let _ = set.evaluate(std::slice::from_ref(&bare), &[]).unwrap();
    }
    println!(
        "builtin evaluate 1 object, nothing in data (no re-prepare): {:.1} us",
        t.elapsed().as_secs_f64() * 1e6 / 200.0
    );
}
