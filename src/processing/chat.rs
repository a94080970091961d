//! The checkpoint's own chat template (Jinja), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (trim_blocks, lstrip_blocks, Python string methods).

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

use super::tokenizer::TokenizerConfig;
use crate::error::{Error, Result};

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
}

/// What a template sees for one message.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateMessage {
    /// `"system"`, `"user"` or `"assistant"`.
    pub role: String,
    /// A string, or a list of `{"type": "text", "text": ...}` / `{"type": "image"}` parts.
    pub content: serde_json::Value,
}

impl ChatTemplate {
    /// The template of a checkpoint: `chat_template.jinja`, `chat_template.json`, or the
    /// `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of which
    /// `default` is used). `None` when the checkpoint has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            return Self::new(source).map(Some);
        }
        let json = dir.join("chat_template.json");
        if json.exists() {
            let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json { path: json.clone(), source })?;
            return template_source(value.get("chat_template")).map(Self::new).transpose();
        }
        let config = TokenizerConfig::from_dir(dir)?;
        template_source(config.chat_template.as_ref()).map(Self::new).transpose()
    }

    /// Compiles a template.
    pub fn new(source: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| strftime_today(&format));
        env.add_template_owned("chat", without_generation_blocks(&source))
            .map_err(|e| Error::Template(e.to_string()))?;
        Ok(Self { env })
    }

    /// Renders a conversation, ending with the assistant's turn opener when `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[TemplateMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        let context = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or_default(),
            eos_token => eos_token.unwrap_or_default(),
        };
        template.render(context).map_err(|e| Error::Template(format!("{e:#}")))
    }
}

/// transformers' `{% generation %}` … `{% endgeneration %}` (which marks the assistant's tokens
/// for training masks and renders its body unchanged) as an always-true `if`, so whitespace
/// control and `trim_blocks` apply exactly as around the original tags.
fn without_generation_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at + 2]);
        rest = &rest[at + 2..];
        let marker = rest.len() - rest.trim_start_matches(['-', '+']).len();
        let body = rest[marker..].trim_start();
        let keyword = ["endgeneration", "generation"].into_iter().find(|keyword| {
            body.strip_prefix(keyword).is_some_and(|after| {
                let after = after.trim_start();
                after.starts_with("%}") || after.starts_with("-%}") || after.starts_with("+%}")
            })
        });
        if let Some(keyword) = keyword {
            out.push_str(&rest[..marker]);
            out.push_str(if keyword == "generation" { " if true " } else { " endif " });
            let after = body[keyword.len()..].trim_start();
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Today's date (UTC) in a `strftime` format, for templates that print it (`%Y %m %d %B %b`).
fn strftime_today(format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((seconds / 86_400) as i64);
    let name = MONTHS[(month - 1) as usize];
    format
        .replace("%Y", &year.to_string())
        .replace("%m", &format!("{month:02}"))
        .replace("%d", &format!("{day:02}"))
        .replace("%B", name)
        .replace("%b", &name[..3])
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The template text of a `chat_template` value: a string, or a list of `{name, template}`.
fn template_source(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(source) => Some(source.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| named.first())
            .and_then(|entry| entry.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_blocks_render_their_body_with_the_same_whitespace() {
        assert_eq!(
            without_generation_blocks("a{% generation %}\nb{%- endgeneration -%} c{%generation%}"),
            "a{% if true %}\nb{%- endif -%} c{% if true %}"
        );
        let template = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}:{% generation %}\n{{ m.content }}{% endgeneration %}\n|{% endfor %}"
                .into(),
        )
        .unwrap();
        let message = TemplateMessage { role: "assistant".into(), content: "hi".into() };
        // trim_blocks removes the newline after each tag, as jinja2 does around transformers' tags.
        assert_eq!(template.render(&[message], false, None, None).unwrap(), "assistant:hi|");
    }

    fn user(text: &str) -> TemplateMessage {
        TemplateMessage { role: "user".into(), content: serde_json::Value::String(text.into()) }
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let template = ChatTemplate::new(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                .into(),
        )
        .unwrap();
        let text = template.render(&[user("hi")], true, None, None).unwrap();
        assert_eq!(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let template = ChatTemplate::new(
            "{% if messages[0].content.strip().startswith('x') %}{{ raise_exception('no x') }}{% endif %}\
             {{ messages[0].content.upper() }}"
                .into(),
        )
        .unwrap();
        assert_eq!(template.render(&[user(" hi ")], false, None, None).unwrap(), " HI ");
        let error = template.render(&[user("xy")], false, None, None).unwrap_err();
        assert!(error.to_string().contains("no x"), "{error}");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        assert!(matches!(ChatTemplate::new("{% for %}".into()), Err(Error::Template(_))));
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn named_templates_pick_default() {
        let value = serde_json::json!([{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]);
        assert_eq!(template_source(Some(&value)).as_deref(), Some("D"));
    }
}
