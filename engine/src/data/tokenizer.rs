//! The model's tokenizer, set up for training, and its chat template.

use std::path::Path;

use serde_json::Value;

use super::records::Message;
use crate::{Error, Result};

/// A plain chat template used when the model ships none. Each turn is `<|role|>\n` + content
/// + `\n`; assistant turns end with the EOS token.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// A `tokenizer.json` tokenizer with padding and truncation switched off (batches are padded
/// dynamically), plus what SFT needs: EOS and the chat template.
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub eos_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: ChatTemplate,
}

fn special_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tc = dir.join("tokenizer_config.json");
        let tcfg = if tc.exists() {
            crate::io::read_json(&tc)?
        } else {
            Value::Null
        };
        let eos_token = special_token(&tcfg, "eos_token");
        let bos_token = special_token(&tcfg, "bos_token");
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if let Some(t) = tcfg.get("chat_template").and_then(|t| t.as_str()) {
            t.to_string()
        } else if template_file.exists() {
            std::fs::read_to_string(&template_file).map_err(|e| Error::io(&template_file, e))?
        } else {
            DEFAULT_CHAT_TEMPLATE.to_string()
        };
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        Ok(TextTokenizer {
            inner,
            eos_id,
            bos_token,
            eos_token,
            chat_template: ChatTemplate::new(chat_template),
        })
    }

    pub(crate) fn encode(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.chat_template.render(
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or_default(),
            self.eos_token.as_deref().unwrap_or_default(),
        )
    }
}

/// Largest chat template accepted (real ones are a few KiB).
pub const MAX_TEMPLATE_BYTES: usize = 64 << 10;
/// Template instructions one rendering may execute (a real template spends a few hundred on
/// a conversation); past it the rendering stops with an error.
pub const TEMPLATE_FUEL: u64 = 1_000_000;
/// Largest rendered conversation (longer ones are truncated to at most 8192 tokens anyway).
pub const MAX_RENDER_BYTES: usize = 4 << 20;

/// A writer that refuses to grow past its cap (so a template cannot fill memory through
/// its output).
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + b.len() > MAX_RENDER_BYTES {
            return Err(std::io::Error::other(
                "the rendered conversation is too long",
            ));
        }
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn template_error(m: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("chat template: {m}"))
}

/// A chat template — untrusted input: it comes with the model — with a size cap on its
/// source, a fuel limit on what it executes and a cap on what it writes. Compiled once, on
/// first use (a model that never renders a conversation never needs it to compile).
pub struct ChatTemplate {
    source: String,
    compiled: std::sync::OnceLock<std::result::Result<minijinja::Environment<'static>, String>>,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            compiled: std::sync::OnceLock::new(),
        }
    }

    fn compile(source: &str) -> std::result::Result<minijinja::Environment<'static>, String> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(format!(
                "{} bytes; at most {MAX_TEMPLATE_BYTES} are accepted",
                source.len()
            ));
        }
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(env)
    }

    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let env = self
            .compiled
            .get_or_init(|| Self::compile(&self.source))
            .as_ref()
            .map_err(template_error)?;
        let tmpl = env.get_template("chat").map_err(template_error)?;
        let mut out = Capped(Vec::new());
        tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos_token,
                eos_token => eos_token,
            },
            &mut out,
        )
        .map_err(|e| {
            template_error(match e.kind() {
                minijinja::ErrorKind::OutOfFuel => format!(
                    "it ran out of fuel ({TEMPLATE_FUEL} instructions): a loop without a sane \
                     bound"
                ),
                minijinja::ErrorKind::WriteFailure => {
                    format!("it wrote more than {MAX_RENDER_BYTES} bytes")
                }
                _ => e.to_string(),
            })
        })?;
        String::from_utf8(out.0).map_err(|_| template_error("it wrote invalid UTF-8"))
    }
}

/// Checks a template before it is stored with a model: its size, and a rendering of a short
/// conversation within the fuel and output caps.
pub fn check_chat_template(template: &str) -> Result<()> {
    let conversation = [
        Message {
            role: "system".into(),
            content: "You are helpful.".into(),
        },
        Message {
            role: "user".into(),
            content: "Hello".into(),
        },
        Message {
            role: "assistant".into(),
            content: "Hi!".into(),
        },
    ];
    ChatTemplate::new(template)
        .render(&conversation, true, "<s>", "</s>")
        .map(|_| ())
}
