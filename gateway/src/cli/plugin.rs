//! `rewind plugin new|build|push|list`: scaffold a plugin crate, build it for
//! `wasm32-wasip2`, upload it (docs/plugins.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::{PluginCommand, Remote};

/// Where the SDK is: the repository this CLI was built from, when it is still there.
fn sdk_dependency(sdk_path: Option<PathBuf>) -> String {
    let local = sdk_path.or_else(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugin-sdk");
        p.join("Cargo.toml")
            .exists()
            .then(|| p.canonicalize().unwrap_or(p))
    });
    match local {
        Some(p) => format!("path = {:?}", p.display().to_string()),
        None => "git = \"https://github.com/rewind-dev/rewind\"".to_string(),
    }
}

fn template(kind: &str, type_name: &str) -> anyhow::Result<String> {
    Ok(match kind {
        "transform" => format!(
            r#"//! A Rewind transform (docs/plugins.md).

use rewind_plugin_sdk::{{Config, Emit, Event, Transform}};

pub struct {type_name};

impl Transform for {type_name} {{
    fn new(_config: Config) -> Result<Self, String> {{
        Ok({type_name})
    }}

    fn transform(&mut self, event: &Event<'_>, out: &mut Emit<'_>) -> Result<(), String> {{
        // Keep every event unchanged; `out.payload(..)` replaces the payload, emitting
        // nothing drops the event, `Err(reason)` sends it to the dead-letter collection.
        let _ = event;
        out.keep();
        Ok(())
    }}
}}

rewind_plugin_sdk::export_transform!({type_name});
"#
        ),
        "destination" => format!(
            r#"//! A Rewind destination (docs/plugins.md). Config: {{"url": "...", "allow_hosts": ["..."]}}

use rewind_plugin_sdk::host::{{HttpRequest, http_send}};
use rewind_plugin_sdk::{{Config, Delivery, Destination, Event}};

pub struct {type_name} {{
    url: String,
}}

impl Destination for {type_name} {{
    fn new(config: Config) -> Result<Self, String> {{
        Ok({type_name} {{ url: config.str("url")?.to_string() }})
    }}

    fn deliver(&mut self, event: &Event<'_>) -> Delivery {{
        let request = HttpRequest {{
            method: "POST".into(),
            url: self.url.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: event.payload.to_vec(),
            timeout_ms: Some(5000),
        }};
        match http_send(&request) {{
            Ok(r) if (200..300).contains(&r.status) => Delivery::Delivered,
            Ok(r) if r.status == 429 || r.status >= 500 => Delivery::Retryable {{
                reason: format!("HTTP {{}}", r.status),
                retry_after_ms: None,
            }},
            Ok(r) => Delivery::Permanent(format!("HTTP {{}}", r.status)),
            Err(reason) => Delivery::Retryable {{ reason, retry_after_ms: None }},
        }}
    }}
}}

rewind_plugin_sdk::export_destination!({type_name});
"#
        ),
        "ingress" => format!(
            r#"//! A Rewind ingress adapter (docs/plugins.md): each request body (a hook) or bus message
//! body (a source) becomes one event.

use rewind_plugin_sdk::{{Config, Ingress, Message, NewEvent, Rejection, Request}};

pub struct {type_name};

impl Ingress for {type_name} {{
    fn new(_config: Config) -> Result<Self, String> {{
        Ok({type_name})
    }}

    fn handle(&mut self, request: &Request) -> Result<Vec<NewEvent>, Rejection> {{
        if request.body.is_empty() {{
            return Err(Rejection::new(400, "empty body"));
        }}
        Ok(vec![NewEvent {{ headers: vec![], payload: request.body.clone() }}])
    }}

    fn handle_message(&mut self, message: &Message) -> Result<Vec<NewEvent>, Rejection> {{
        Ok(vec![NewEvent {{ headers: vec![], payload: message.body.clone() }}])
    }}
}}

rewind_plugin_sdk::export_ingress!({type_name});
"#
        ),
        other => bail!("unknown plugin kind {other:?}: use transform, destination or ingress"),
    })
}

fn type_name(name: &str) -> String {
    let mut out = String::new();
    for part in name.split(['-', '_', '.']) {
        let mut chars = part.chars();
        if let Some(c) = chars.next() {
            out.extend(c.to_uppercase());
            out.extend(chars);
        }
    }
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert_str(0, "Plugin");
    }
    out
}

/// The `.wasm` a plugin crate builds to.
fn wasm_path(dir: &Path) -> anyhow::Result<PathBuf> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))
        .with_context(|| format!("no Cargo.toml in {}", dir.display()))?;
    let value: toml::Value = toml::from_str(&manifest).context("Cargo.toml does not parse")?;
    let name = value["package"]["name"]
        .as_str()
        .context("Cargo.toml has no package.name")?
        .replace('-', "_");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| dir.join("target"));
    Ok(target
        .join("wasm32-wasip2/release")
        .join(format!("{name}.wasm")))
}

pub async fn run(remote: Remote, command: PluginCommand) -> anyhow::Result<()> {
    match command {
        PluginCommand::New {
            name,
            kind,
            sdk_path,
        } => {
            let dir = PathBuf::from(&name);
            if dir.exists() {
                bail!("{} already exists", dir.display());
            }
            let source = template(&kind, &type_name(&name))?;
            std::fs::create_dir_all(dir.join("src"))?;
            std::fs::write(
                dir.join("Cargo.toml"),
                format!(
                    "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nrewind-plugin-sdk = {{ {}, features = [\"{kind}\"] }}\n\n[profile.release]\nstrip = true\nlto = true\n\n[workspace]\n",
                    sdk_dependency(sdk_path)
                ),
            )?;
            std::fs::write(dir.join("src/lib.rs"), source)?;
            println!(
                "created {kind} plugin {name}/\nnext: cd {name} && rewind plugin build && rewind plugin push --name {name} --version 0.1.0"
            );
            Ok(())
        }
        PluginCommand::Build { dir } => {
            let status = Command::new("rustup")
                .args(["target", "add", "wasm32-wasip2"])
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("could not run `rustup target add wasm32-wasip2`; building anyway");
            }
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "--release", "--target", "wasm32-wasip2"])
                .current_dir(&dir)
                .status()
                .context("cannot run cargo")?;
            if !status.success() {
                bail!("cargo build failed");
            }
            let wasm = wasm_path(&dir)?;
            println!("{}", wasm.display());
            Ok(())
        }
        PluginCommand::Push {
            file,
            name,
            version,
            dir,
        } => {
            let file = match file {
                Some(f) => f,
                None => wasm_path(&dir)?,
            };
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let token = remote
                .token
                .clone()
                .context("no token: set REWIND_TOKEN (or pass --token) to an admin token")?;
            let resp = reqwest::Client::new()
                .post(format!("{}/v1/plugins", remote.url.trim_end_matches('/')))
                .query(&[("name", name.as_str()), ("version", version.as_str())])
                .bearer_auth(token)
                .header("content-type", "application/wasm")
                .body(bytes)
                .send()
                .await
                .with_context(|| format!("cannot reach the gateway at {}", remote.url))?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if !status.is_success() {
                bail!(
                    "{status}: {}",
                    body["error"]["message"]
                        .as_str()
                        .unwrap_or("upload refused")
                );
            }
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn type_names() {
        assert_eq!(super::type_name("my-webhook"), "MyWebhook");
        assert_eq!(super::type_name("9lives"), "Plugin9lives");
    }
}
