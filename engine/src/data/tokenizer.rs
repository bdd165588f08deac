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
    pub chat_template: String,
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
            chat_template,
        })
    }

    pub(crate) fn encode(&self, text: &str, special: bool) -> Result<tokenizers::Encoding> {
        self.inner
            .encode(text, special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", &self.chat_template)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let tmpl = env.get_template("chat").expect("just added");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
