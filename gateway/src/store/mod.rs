//! Store backends. The trait and its records are [`postern_core::store`]; this module holds
//! the embedded default, SQLite ([`sqlite::SqliteStore`]), and PostgreSQL
//! ([`postgres::PgStore`], chosen with `[store] url`; docs/scale-out.md).

pub mod postgres;
pub mod sqlite;

use std::path::Path;
use std::sync::Arc;

pub use postern_core::store::*;

/// The store the configuration names: PostgreSQL at `url`, or else the SQLite file
/// `postern.db` in `data_dir`. Errors never show the URL's password.
pub async fn open(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    use anyhow::Context;
    Ok(match url {
        Some(url) => Arc::new(postgres::PgStore::connect(url).await.with_context(|| {
            format!("connecting to the [store] url database {} (is it running and reachable?)", postgres::describe(url))
        })?),
        None => Arc::new(
            sqlite::SqliteStore::open(&data_dir.join("postern.db"))
                .await
                .with_context(|| format!("opening database in {}", data_dir.display()))?,
        ),
    })
}

/// The store's schema version and the one this binary wants, read without creating,
/// migrating or changing anything (`postern doctor`); `None` when the SQLite file does not
/// exist yet (the gateway creates it at first start). Errors never show a password.
pub async fn probe(url: Option<&str>, data_dir: &Path) -> anyhow::Result<Option<(i64, usize)>> {
    use anyhow::Context;
    match url {
        Some(url) => postgres::probe(url).await.map(Some).with_context(|| {
            format!("connecting to the [store] url database {} (is it running and reachable?)", postgres::describe(url))
        }),
        None => {
            let path = data_dir.join("postern.db");
            if !path.exists() {
                return Ok(None);
            }
            sqlite::probe(&path).await.map(Some).with_context(|| format!("opening {}", path.display()))
        }
    }
}
