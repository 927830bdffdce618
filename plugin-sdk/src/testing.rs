//! Run a plugin natively in unit tests, without building WASM: the same batch encoding and
//! the same per-event handling as inside the component.

use crate::codec::{BatchWriter, Outcome, OutcomeReader};
use crate::config::Config;

/// Runs transform `T` with `config` over payloads (events get ids `E0`, `E1`, … and a JSON
/// content-type header). Per input event: the payloads it became, or its failure reason.
/// `Err` when the config is refused.
#[allow(clippy::type_complexity)]
pub fn run_transform<T: crate::Transform>(
    config: &str,
    payloads: &[&[u8]],
) -> Result<Vec<Result<Vec<Vec<u8>>, String>>, String> {
    let mut t = T::new(Config::parse(config)?)?;
    let mut w = BatchWriter::new();
    for (i, p) in payloads.iter().enumerate() {
        w.push(
            &format!("E{i}"),
            i as i64,
            [("content-type", "application/json")],
            p,
        );
    }
    let out = crate::transform_batch(&mut t, &w.finish()).map_err(|e| e.to_string())?;
    let mut results = Vec::new();
    let outcomes = OutcomeReader::new(&out).map_err(|e| e.to_string())?;
    for (o, input) in outcomes.zip(payloads) {
        results.push(match o.map_err(|e| e.to_string())? {
            Outcome::Failed(reason) => Err(reason.to_string()),
            Outcome::Unchanged => Ok(vec![input.to_vec()]),
            Outcome::Events(b) => Ok(b
                .events()
                .map(|e| e.map(|e| e.payload.to_vec()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?),
        });
    }
    Ok(results)
}
