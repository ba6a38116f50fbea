//! Values as a person reads them (shortened), as JSON (whole) and as SQL literals.

use rusqlite::types::Value;

/// The longest text or blob shown whole on a line; longer ones are cut with `…` and
/// their size.
pub const SHORT_VALUE_CHARS: usize = 40;

/// A value for a line of text: `NULL`, `42`, `1.5`, `'text'` (quotes doubled), `x'00ff'`;
/// text longer than [`SHORT_VALUE_CHARS`] characters and blobs longer than half that
/// many bytes are cut, with their full length after them.
pub fn short_value(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => real_literal(*r),
        Value::Text(t) => {
            let n = t.chars().count();
            if n <= SHORT_VALUE_CHARS {
                format!("'{}'", t.replace('\'', "''"))
            } else {
                let cut: String = t.chars().take(SHORT_VALUE_CHARS).collect();
                format!("'{}'… ({n} chars)", cut.replace('\'', "''"))
            }
        }
        Value::Blob(b) => {
            let limit = SHORT_VALUE_CHARS / 2;
            if b.len() <= limit {
                format!("x'{}'", hex::encode(b))
            } else {
                format!("x'{}'… ({} bytes)", hex::encode(&b[..limit]), b.len())
            }
        }
    }
}

/// A value as JSON, whole: null, a number, a string, or `{"blob": "<hex>"}` for a blob
/// (JSON has no bytes). A REAL that is not finite is `{"real": "inf"}` / `"-inf"`.
pub fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(r) => match serde_json::Number::from_f64(*r) {
            Some(n) => serde_json::Value::Number(n),
            None => serde_json::json!({ "real": if *r > 0.0 { "inf" } else { "-inf" } }),
        },
        Value::Text(t) => t.clone().into(),
        Value::Blob(b) => serde_json::json!({ "blob": hex::encode(b) }),
    }
}

/// A value as an SQL literal that reads back as the same value and type.
pub fn sql_literal(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => real_literal(*r),
        Value::Text(t) => format!("'{}'", t.replace('\'', "''")),
        Value::Blob(b) => format!("x'{}'", hex::encode(b)),
    }
}

/// A REAL as a literal SQLite reads back as the same REAL: the shortest round-trip
/// form, with `.0` where it would otherwise read as an INTEGER, and 1e999 for infinity.
fn real_literal(r: f64) -> String {
    if r.is_infinite() {
        return if r > 0.0 {
            "1e999".into()
        } else {
            "-1e999".into()
        };
    }
    let s = format!("{r:?}");
    if s.contains(['.', 'e', 'E']) || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

/// An identifier quoted for SQL: `"name"`, inner quotes doubled.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_values_are_cut_with_their_length() {
        assert_eq!(short_value(&Value::Text("it's".into())), "'it''s'");
        let long = "x".repeat(100);
        assert_eq!(
            short_value(&Value::Text(long)),
            format!("'{}'… (100 chars)", "x".repeat(40))
        );
        assert_eq!(short_value(&Value::Blob(vec![0, 255])), "x'00ff'");
        assert!(short_value(&Value::Blob(vec![1; 64])).ends_with("… (64 bytes)"));
        assert_eq!(short_value(&Value::Real(2.0)), "2.0");
    }

    #[test]
    fn sql_literals_read_back_as_the_same_value() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for v in [
            Value::Null,
            Value::Integer(-7),
            Value::Real(2.0),
            Value::Real(0.1),
            Value::Real(-1.5e-300),
            Value::Real(f64::INFINITY),
            Value::Text("a'b\"c é".into()),
            Value::Blob(vec![]),
            Value::Blob(vec![0, 1, 254]),
        ] {
            let back: Value = conn
                .query_row(&format!("SELECT {}", sql_literal(&v)), [], |r| r.get(0))
                .unwrap();
            assert_eq!(back, v);
        }
    }

    #[test]
    fn json_values_are_whole() {
        assert_eq!(
            value_json(&Value::Blob(vec![1, 2])),
            serde_json::json!({"blob": "0102"})
        );
        assert_eq!(
            value_json(&Value::Text("x".repeat(100))),
            serde_json::json!("x".repeat(100))
        );
        assert_eq!(value_json(&Value::Real(1.5)), serde_json::json!(1.5));
    }
}
