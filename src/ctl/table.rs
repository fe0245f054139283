//! Plain-text tables for people: one header row, columns padded to their widest
//! cell, numbers right-aligned. Cells come from dotted paths into the API's JSON.

use serde_json::Value;

/// One column: its header and the dotted path of the value (`message_stats.publish`).
pub struct Column {
    pub header: &'static str,
    pub path: &'static str,
}

pub const fn col(header: &'static str, path: &'static str) -> Column {
    Column { header, path }
}

/// The value at `path` ("a.b.c"), if any.
pub fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// How one JSON value reads in a cell.
pub fn text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| text(Some(i)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(Value::Object(map)) if map.is_empty() => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Renders `rows` (the items of a list answer) under `columns`.
pub fn render(columns: &[Column], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| text(lookup(r, c.path))).collect())
        .collect();
    let numeric: Vec<bool> = (0..columns.len())
        .map(|i| {
            rows.iter().all(|r| {
                columns
                    .get(i)
                    .and_then(|c| lookup(r, c.path))
                    .is_none_or(|v| v.is_number() || v.is_null())
            }) && !rows.is_empty()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .filter_map(|row| row.get(i))
                .map(|s| s.chars().count())
                .chain(std::iter::once(c.header.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, v) in values.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let right = numeric.get(i).copied().unwrap_or(false);
            if i > 0 {
                out.push_str("  ");
            }
            let pad = w.saturating_sub(v.chars().count());
            if right {
                out.push_str(&" ".repeat(pad));
                out.push_str(v);
            } else {
                out.push_str(v);
                if i + 1 < values.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(columns.iter().map(|c| c.header).collect());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Key/value lines for one object (`show overview`, a single queue).
pub fn render_pairs(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aligns_text_left_and_numbers_right() {
        let rows = vec![
            json!({"name": "orders", "messages": 1200, "arguments": {}}),
            json!({"name": "q", "messages": 3}),
        ];
        let t = render(&[col("name", "name"), col("messages", "messages")], &rows);
        assert_eq!(t, "name    messages\norders      1200\nq              3\n");
    }

    #[test]
    fn dotted_paths_and_arrays() {
        let row = json!({"a": {"b": 2.5}, "tags": ["x", "y"]});
        assert_eq!(text(lookup(&row, "a.b")), "2.5");
        assert_eq!(text(lookup(&row, "tags")), "x, y");
        assert_eq!(text(lookup(&row, "missing.path")), "");
    }
}
