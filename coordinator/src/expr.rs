//! Expressions: CEL (the `cel` crate) over JSON variables, and templates — any JSON/YAML value
//! whose strings may hold `${ <cel> }`. A string that is exactly one `${ ... }` becomes the
//! expression's value (any type); a string mixing text and `${ ... }` becomes text.
//!
//! Variables: `input`, `trigger`, `steps` (`steps.<id>.output`, `steps.<id>.status`),
//! `instance` (`id`, `workflow`, `version`), plus `result` in a step's `output`, the `for`
//! variables (`item`, `index` by default), and `output` in a compensation's `with`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

/// Variables every expression of a workflow may use.
pub const ROOT_VARS: &[&str] = &["input", "trigger", "steps", "instance"];

/// Named JSON values an expression is evaluated against.
pub type Vars = BTreeMap<String, Value>;

/// A piece of a template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part<'a> {
    Text(&'a str),
    Expr(&'a str),
}

/// `${ e }` → `e`; anything else is returned as it is (a bare expression).
pub fn strip(s: &str) -> &str {
    let t = s.trim();
    match t.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        Some(inner) if parts(t).map(|p| p.len() == 1).unwrap_or(false) => inner.trim(),
        _ => t,
    }
}

/// Splits a template string into text and `${ ... }` expressions. Braces inside an expression
/// (map literals) and quoted strings are skipped when looking for the closing brace.
pub fn parts(s: &str) -> Result<Vec<Part<'_>>, String> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut text_start = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
            if text_start < i {
                out.push(Part::Text(&s[text_start..i]));
            }
            let start = i + 2;
            let mut depth = 1;
            let mut j = start;
            let mut quote: Option<u8> = None;
            while j < bytes.len() && depth > 0 {
                let b = bytes[j];
                match quote {
                    Some(_) if b == b'\\' => j += 1,
                    Some(q) if b == q => quote = None,
                    Some(_) => {}
                    None => match b {
                        b'"' | b'\'' => quote = Some(b),
                        b'{' => depth += 1,
                        b'}' => depth -= 1,
                        _ => {}
                    },
                }
                j += 1;
            }
            if depth > 0 {
                return Err("`${` is not closed by `}`".into());
            }
            let inner = s[start..j - 1].trim();
            if inner.is_empty() {
                return Err("empty `${ }`".into());
            }
            out.push(Part::Expr(inner));
            i = j;
            text_start = j;
        } else {
            i += 1;
        }
    }
    if text_start < s.len() {
        out.push(Part::Text(&s[text_start..]));
    }
    Ok(out)
}

/// Every string in a template value.
pub fn strings(value: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    fn walk<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::String(s) => out.push(s),
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(value, &mut out);
    out
}

/// Compiles `expr` and checks it only uses `vars` (plus CEL's own functions).
pub fn check(expr: &str, vars: &[&str]) -> Result<(), String> {
    let program = cel::Program::compile(expr).map_err(|e| one_line(&e.to_string()))?;
    let mut free = Vec::new();
    free_variables(program.expression(), &mut Vec::new(), &mut free);
    free.sort();
    free.dedup();
    let unknown: Vec<&str> = free.into_iter().filter(|v| !vars.contains(v)).collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown variable{} {} (available: {})",
            if unknown.len() > 1 { "s" } else { "" },
            unknown
                .iter()
                .map(|v| format!("`{v}`"))
                .collect::<Vec<_>>()
                .join(", "),
            vars.join(", ")
        ))
    }
}

/// Variables an expression reads that no comprehension (`exists`, `map`, ...) binds.
fn free_variables<'e>(e: &'e cel::IdedExpr, bound: &mut Vec<&'e str>, out: &mut Vec<&'e str>) {
    use cel::common::ast::{EntryExpr, Expr};
    let entry = |x: &'e EntryExpr| -> Vec<&'e cel::IdedExpr> {
        match x {
            EntryExpr::StructField(f) => vec![&f.value],
            EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
        }
    };
    match &e.expr {
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.contains(&name.as_str()) {
                out.push(name);
            }
        }
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                free_variables(t, bound, out);
            }
            for a in &c.args {
                free_variables(a, bound, out);
            }
        }
        Expr::Comprehension(c) => {
            free_variables(&c.iter_range, bound, out);
            free_variables(&c.accu_init, bound, out);
            let n = bound.len();
            bound.push(&c.iter_var);
            if let Some(v) = &c.iter_var2 {
                bound.push(v);
            }
            bound.push(&c.accu_var);
            for part in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(part, bound, out);
            }
            bound.truncate(n);
        }
        Expr::List(l) => l
            .elements
            .iter()
            .for_each(|x| free_variables(x, bound, out)),
        Expr::Map(m) => {
            for x in m.entries.iter().flat_map(|en| entry(&en.expr)) {
                free_variables(x, bound, out);
            }
        }
        Expr::Struct(s) => {
            for x in s.entries.iter().flat_map(|en| entry(&en.expr)) {
                free_variables(x, bound, out);
            }
        }
        Expr::Select(s) => free_variables(&s.operand, bound, out),
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// JSON → CEL. Whole numbers become `int` (CEL's default), so `x > 5` works on JSON numbers.
pub fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => cel::Value::Int(i),
            None => match n.as_u64() {
                Some(u) => cel::Value::UInt(u),
                None => cel::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(a) => cel::Value::List(Arc::new(a.iter().map(to_cel).collect())),
        Value::Object(o) => {
            let map: HashMap<String, cel::Value> =
                o.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            cel::Value::from(map)
        }
    }
}

/// Evaluates a bare CEL expression (or one wrapped in `${ }`).
pub fn eval(expr: &str, vars: &Vars) -> Result<Value, String> {
    let expr = strip(expr);
    let program = cel::Program::compile(expr).map_err(|e| one_line(&e.to_string()))?;
    let mut context = cel::Context::default();
    for (name, value) in vars {
        context.add_variable_from_value(name.clone(), to_cel(value));
    }
    let value = program
        .execute(&context)
        .map_err(|e| format!("`{expr}`: {e}"))?;
    value.json().map_err(|e| format!("`{expr}`: {e:?}"))
}

/// Evaluates a condition; it must give a boolean.
pub fn eval_bool(expr: &str, vars: &Vars) -> Result<bool, String> {
    match eval(expr, vars)? {
        Value::Bool(b) => Ok(b),
        other => Err(format!(
            "`{}` gave {other}, not a boolean",
            strip(expr).trim()
        )),
    }
}

/// Renders a template value.
pub fn render(template: &Value, vars: &Vars) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => render_str(s, vars)?,
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|v| render(v, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn render_str(s: &str, vars: &Vars) -> Result<Value, String> {
    let parts = parts(s)?;
    match parts.as_slice() {
        [] => Ok(Value::String(String::new())),
        [Part::Expr(e)] => eval(e, vars),
        _ => {
            let mut out = String::new();
            for p in parts {
                match p {
                    Part::Text(t) => out.push_str(t),
                    Part::Expr(e) => match eval(e, vars)? {
                        Value::String(v) => out.push_str(&v),
                        Value::Null => {}
                        other => out.push_str(&other.to_string()),
                    },
                }
            }
            Ok(Value::String(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars() -> Vars {
        let mut v = Vars::new();
        v.insert(
            "input".into(),
            json!({"n": 7, "name": "x", "files": ["a", "b"], "f": 1.5}),
        );
        v.insert(
            "steps".into(),
            json!({"lint": {"output": {"score": 9}, "status": "succeeded"}}),
        );
        v
    }

    #[test]
    fn evaluates_cel_over_json() {
        let v = vars();
        assert_eq!(eval("input.n + 1", &v).unwrap(), json!(8));
        assert!(eval_bool("steps.lint.output.score > 5", &v).unwrap());
        assert!(eval_bool("${ input.name == 'x' }", &v).unwrap());
        assert_eq!(eval("size(input.files)", &v).unwrap(), json!(2));
        assert!(eval_bool("input.f > 1.0", &v).unwrap());
        assert_eq!(
            eval("input.files.map(f, f + '!')", &v).unwrap(),
            json!(["a!", "b!"])
        );
        assert!(eval_bool("has(input.n) && !has(input.zz)", &v).unwrap());
        assert!(eval("input.zz", &v).is_err());
        assert!(eval_bool("input.n", &v).is_err());
    }

    #[test]
    fn renders_templates() {
        let v = vars();
        let t = json!({"a": "${ input.n }", "b": "n=${input.n}, ${ input.name }", "c": [1, "${ {'k': input.n} }"], "d": "plain"});
        assert_eq!(
            render(&t, &v).unwrap(),
            json!({"a": 7, "b": "n=7, x", "c": [1, {"k": 7}], "d": "plain"})
        );
        assert!(parts("${ input").is_err());
        assert_eq!(strip("${ a.b }"), "a.b");
        assert_eq!(strip("a.b"), "a.b");
    }

    #[test]
    fn checks_syntax_and_variables() {
        assert!(check("input.n > 1", ROOT_VARS).is_ok());
        let err = check("input.n >", ROOT_VARS).unwrap_err();
        assert!(!err.is_empty());
        let err = check("inptu.n > 1", ROOT_VARS).unwrap_err();
        assert!(err.contains("`inptu`"), "{err}");
        assert!(check("[1,2].exists(x, x > input.n)", ROOT_VARS).is_ok());
    }
}
