//! `vmm-demo migrate`: ask a running `vmm-demo run --control` to migrate its guest.

use std::path::Path;
use std::time::Duration;

use super::progress::Progress;
use crate::cli::MigrateArgs;
use crate::client::ControlClient;
use crate::error::Error;
use crate::protocol::MigrateRequest;
use crate::report::MigrationReport;

/// Runs `vmm-demo migrate`: the source's report of the completed migration.
pub fn migrate(a: &MigrateArgs) -> Result<MigrationReport, Error> {
    let mut c = ControlClient::connect(Path::new(&a.control), Duration::from_secs(5))?;
    let p = Progress::new();
    let r = c.migrate(
        MigrateRequest {
            to: a.to.clone(),
            options: a.options.clone(),
        },
        &mut |e| p.event(e),
    );
    p.finish();
    Ok(r?)
}
