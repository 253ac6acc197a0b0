//! Reads a spanned TOML document field by field.
//!
//! serde's derive stops at the first unknown key or wrong type; reading each field ourselves lets
//! the configuration report every problem of a file at once, each with its TOML path and position.

use std::{ops::Range, str::FromStr};

use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::Diagnostic;

/// Collects errors and warnings while a document is read and validated.
pub(crate) struct Diags<'s> {
    src: &'s str,
    pub(crate) errors: Vec<Diagnostic>,
    pub(crate) warnings: Vec<Diagnostic>,
}

impl<'s> Diags<'s> {
    pub(crate) fn new(src: &'s str) -> Self {
        Diags {
            src,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn diagnostic(&self, path: &str, span: Option<Range<usize>>, message: String) -> Diagnostic {
        let position = span.map(|s| line_column(self.src, s.start));
        Diagnostic {
            path: path.to_owned(),
            line: position.map(|p| p.0),
            column: position.map(|p| p.1),
            message,
        }
    }

    /// Records an error at `path` (and `span`, when known).
    pub(crate) fn error(&mut self, path: &str, span: Option<Range<usize>>, msg: impl Into<String>) {
        let d = self.diagnostic(path, span, msg.into());
        self.errors.push(d);
    }

    /// Records a warning at `path` (and `span`, when known).
    pub(crate) fn warn(&mut self, path: &str, span: Option<Range<usize>>, msg: impl Into<String>) {
        let d = self.diagnostic(path, span, msg.into());
        self.warnings.push(d);
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A TOML path such as `services[2].port`.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// One value of the document, with its path.
#[derive(Clone)]
pub(crate) struct Val<'a, 'i> {
    value: &'a Spanned<DeValue<'i>>,
    path: String,
}

/// What a value is, for messages ("found a string").
fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'a, 'i> Val<'a, 'i> {
    /// The byte range of the value in the source.
    pub(crate) fn span(&self) -> Range<usize> {
        self.value.span()
    }

    /// The value's TOML path.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// Records an error about this value.
    pub(crate) fn error(&self, d: &mut Diags<'_>, msg: impl Into<String>) {
        d.error(&self.path, Some(self.span()), msg);
    }

    /// Records a warning about this value.
    pub(crate) fn warn(&self, d: &mut Diags<'_>, msg: impl Into<String>) {
        d.warn(&self.path, Some(self.span()), msg);
    }

    fn wrong_type(&self, d: &mut Diags<'_>, expected: &str) {
        self.error(
            d,
            format!("expected {expected}, found {}", kind(self.value.get_ref())),
        );
    }

    /// The value as a string.
    pub(crate) fn str(&self, d: &mut Diags<'_>) -> Option<&'a str> {
        match self.value.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.wrong_type(d, "a string");
                None
            }
        }
    }

    /// The value as a string, parsed with `FromStr`; `expected` describes the accepted form.
    pub(crate) fn parse<T: FromStr>(&self, d: &mut Diags<'_>, expected: &str) -> Option<T> {
        match self.value.get_ref() {
            DeValue::String(s) => match s.parse() {
                Ok(v) => Some(v),
                Err(_) => {
                    self.error(d, format!("expected {expected}, found {s:?}"));
                    None
                }
            },
            _ => {
                self.wrong_type(d, &format!("a string ({expected})"));
                None
            }
        }
    }

    /// The value as one of `choices` (a string), returning its position in `choices`.
    pub(crate) fn choice(&self, d: &mut Diags<'_>, choices: &[&str]) -> Option<usize> {
        let expected = choices
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(" | ");
        match self.value.get_ref() {
            DeValue::String(s) => {
                let found = choices.iter().position(|c| *c == s.as_ref());
                if found.is_none() {
                    self.error(d, format!("expected one of {expected}, found {s:?}"));
                }
                found
            }
            _ => {
                self.wrong_type(d, &format!("one of {expected}"));
                None
            }
        }
    }

    /// The value as a boolean.
    pub(crate) fn bool(&self, d: &mut Diags<'_>) -> Option<bool> {
        match self.value.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(d, "a boolean (true or false)");
                None
            }
        }
    }

    /// The value as an integer within `range` (inclusive).
    pub(crate) fn int(&self, d: &mut Diags<'_>, min: i64, max: i64) -> Option<i64> {
        let expected = format!("an integer in {min}..={max}");
        match self.value.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) if (min..=max).contains(&n) => Some(n),
                _ => {
                    self.error(d, format!("expected {expected}, found {i}"));
                    None
                }
            },
            _ => {
                self.wrong_type(d, &expected);
                None
            }
        }
    }

    /// The value as an array of values, each with its own path (`key[i]`).
    pub(crate) fn array(&self, d: &mut Diags<'_>) -> Option<Vec<Val<'a, 'i>>> {
        match self.value.get_ref() {
            DeValue::Array(a) => Some(
                a.iter()
                    .enumerate()
                    .map(|(i, value)| Val {
                        value,
                        path: format!("{}[{i}]", self.path),
                    })
                    .collect(),
            ),
            _ => {
                self.wrong_type(d, "an array");
                None
            }
        }
    }

    /// The value as a table.
    pub(crate) fn table(&self, d: &mut Diags<'_>) -> Option<Table<'a, 'i>> {
        match self.value.get_ref() {
            DeValue::Table(t) => Some(Table {
                table: t,
                path: self.path.clone(),
                span: self.span(),
                seen: Vec::new(),
            }),
            _ => {
                self.wrong_type(d, "a table");
                None
            }
        }
    }
}

/// A table of the document: hands out its fields and, at the end, reports keys nobody asked for.
pub(crate) struct Table<'a, 'i> {
    table: &'a DeTable<'i>,
    path: String,
    span: Range<usize>,
    seen: Vec<&'static str>,
}

impl<'a, 'i> Table<'a, 'i> {
    /// The root table of a document.
    pub(crate) fn root(table: &'a Spanned<DeTable<'i>>) -> Self {
        Table {
            table: table.get_ref(),
            path: String::new(),
            span: table.span(),
            seen: Vec::new(),
        }
    }

    /// The table's TOML path.
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// The table's byte range (its header, or its inline braces).
    pub(crate) fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// The value under `key`, if present.
    pub(crate) fn get(&mut self, key: &'static str) -> Option<Val<'a, 'i>> {
        self.seen.push(key);
        let (_, value) = self
            .table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == key)?;
        Some(Val {
            value,
            path: join(&self.path, key),
        })
    }

    /// The value under `key`, or an error saying it is missing and what it should be.
    pub(crate) fn required(
        &mut self,
        d: &mut Diags<'_>,
        key: &'static str,
        expected: &str,
    ) -> Option<Val<'a, 'i>> {
        let v = self.get(key);
        if v.is_none() {
            d.error(
                &join(&self.path, key),
                Some(self.span()),
                format!("missing key `{key}`: expected {expected}"),
            );
        }
        v
    }

    /// Reports every key that was not asked for, listing the keys this table accepts.
    pub(crate) fn finish(self, d: &mut Diags<'_>) {
        for (k, _) in self.table.iter() {
            let key = k.get_ref().as_ref();
            if !self.seen.contains(&key) {
                let mut known = self.seen.clone();
                known.sort_unstable();
                let place = if self.path.is_empty() {
                    "at the top level".to_owned()
                } else {
                    format!("in `{}`", self.path)
                };
                d.error(
                    &join(&self.path, key),
                    Some(k.span()),
                    format!(
                        "unknown key `{key}` {place}; expected one of: {}",
                        known.join(", ")
                    ),
                );
            }
        }
    }
}
