//! `diff` and `apply`: the declarative workflow. The server computes the plan
//! (the `Plan` admin call) against its current revision; `apply` commits it
//! as one write guarded by that revision, so a concurrent change makes it
//! fail as a whole instead of being overwritten.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use gatehouse_model::diff::{self, Action, Change, FieldChange, Plan, OWNER_LABEL};
use gatehouse_model::file::Loaded;
use gatehouse_model::{ObjectRef, Op};
use gatehouse_proto::pb;

use crate::{call, connect, with_source, Cli, ServerError};

/// `diff` found differences.
pub const EXIT_DIFFERS: u8 = 2;
/// `apply` lost a race: the configuration changed after the plan was made.
pub const EXIT_CONFLICT: u8 = 3;

/// What `diff` and `apply` read, and which objects they may delete.
#[derive(Args, Clone)]
pub struct PlanArgs {
    /// A YAML file, or a directory of them (read recursively, sorted).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Also delete objects of the same owner that the files no longer
    /// contain. The owner is `--owner`, or else the `gatehouse.io/owner`
    /// label that every object in the files must carry (one value).
    #[arg(long)]
    pub prune: bool,
    /// The team that owns the files: every object must carry the label
    /// `gatehouse.io/owner=TEAM`.
    #[arg(long)]
    pub owner: Option<String>,
}

#[derive(Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// `text` (one line per change) or `json` (the plan as one JSON object:
    /// revision, changes with action, target and fields).
    #[arg(long, short = 'o', value_enum, default_value_t = DiffOutput::Text)]
    pub output: DiffOutput,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffOutput {
    Text,
    Json,
}

#[derive(Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Validate and show the plan on the server; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply only if the plan is made at this configuration revision (the
    /// one a reviewed `diff` printed); otherwise fail as a conflict (exit 3).
    #[arg(long)]
    pub expected_revision: Option<u64>,
}

/// The owner the files are applied for, checked against every object.
fn owner(args: &PlanArgs, loaded: &Loaded) -> Result<Option<String>> {
    let owner = match (&args.owner, args.prune) {
        (Some(o), _) => Some(o.clone()),
        (None, false) => None,
        (None, true) => {
            let found: std::collections::BTreeSet<&str> = loaded
                .objects
                .iter()
                .filter_map(|o| o.labels().get(OWNER_LABEL).map(String::as_str))
                .collect();
            match found.len() {
                1 => found.into_iter().next().map(str::to_string),
                0 => bail!(
                    "--prune needs an owner: label every object {OWNER_LABEL}=TEAM, or pass --owner TEAM"
                ),
                _ => bail!(
                    "--prune needs one owner, but the files carry {OWNER_LABEL} = {}; pass --owner TEAM",
                    found.into_iter().collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    if let Some(o) = &owner {
        diff::check_owner(&loaded.objects, o).map_err(|e| with_source(e.into(), loaded))?;
    }
    Ok(owner)
}

/// Reads and checks the files (offline rules first), then asks the server for the plan.
async fn make_plan(cli: &Cli, args: &PlanArgs) -> Result<(Loaded, Plan)> {
    let loaded = Loaded::read(&args.file)?;
    loaded
        .to_command()
        .validate_standalone()
        .map_err(|e| with_source(e.into(), &loaded))?;
    let owner = owner(args, &loaded)?;
    let client = connect(cli).await?;
    let request = pb::PlanRequest {
        objects: loaded.objects.iter().map(pb::Object::from).collect(),
        prune_owner: if args.prune { owner } else { None },
    };
    let reply = call(cli, true, || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.plan(r).await }
    })
    .await
    .map_err(|e| with_source(e, &loaded))?;
    let plan = from_pb(reply)?;
    Ok((loaded, plan))
}

fn from_pb(reply: pb::PlanResponse) -> Result<Plan> {
    let changes = reply
        .changes
        .into_iter()
        .map(|c| {
            let target = c
                .target
                .ok_or_else(|| anyhow!("server sent a plan change without a target"))?;
            Ok(Change {
                action: c.action.parse::<Action>().map_err(|e| anyhow!(e))?,
                target: ObjectRef::try_from(target)
                    .map_err(|e| anyhow!("server sent an invalid plan: {e}"))?,
                fields: c
                    .fields
                    .into_iter()
                    .map(|f| FieldChange {
                        path: f.path,
                        before: f.before,
                        after: f.after,
                        secret: f.secret,
                    })
                    .collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Plan {
        revision: reply.config_revision,
        changes,
    })
}

fn print_plan(plan: &Plan) {
    println!(
        "plan against revision {}: {}",
        plan.revision,
        plan.summary()
    );
    for change in &plan.changes {
        println!("{change}");
    }
}

/// `gatehousectl diff`: 0 when the cluster matches the files, 2 when not.
pub async fn diff(cli: &Cli, diff: &DiffArgs) -> Result<ExitCode> {
    let args = &diff.plan;
    let (_, plan) = make_plan(cli, args).await?;
    if diff.output == DiffOutput::Json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else if plan.is_empty() {
        println!(
            "no changes: the cluster at revision {} matches {}",
            plan.revision,
            args.file.display()
        );
    } else {
        print_plan(&plan);
    }
    Ok(if plan.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DIFFERS)
    })
}

/// `gatehousectl apply`: the plan, committed as one write at its revision.
pub async fn apply(cli: &Cli, apply: &ApplyArgs) -> Result<ExitCode> {
    let (args, dry_run) = (&apply.plan, apply.dry_run);
    let (loaded, plan) = make_plan(cli, args).await?;
    if let Some(expected) = apply.expected_revision.filter(|r| *r != plan.revision) {
        eprintln!(
            "error: conflict: the configuration is at revision {}, --expected-revision is {expected}; nothing was written: run diff again and review the new plan",
            plan.revision
        );
        return Ok(ExitCode::from(EXIT_CONFLICT));
    }
    if plan.is_empty() {
        println!(
            "no changes: the cluster at revision {} matches {}",
            plan.revision,
            args.file.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if dry_run {
        print_plan(&plan);
        println!("dry run: the plan is valid on the server; nothing was written");
        return Ok(ExitCode::SUCCESS);
    }
    let cmd = plan.command(&loaded.objects);
    let request = pb::ApplyRequest {
        ops: cmd.ops.iter().map(op_to_pb).collect(),
        expected_config_revision: cmd.expected_config_revision,
    };
    let client = connect(cli).await?;
    let reply = call(cli, false, || {
        let mut c = client.clone();
        let r = request.clone();
        async move { c.apply(r).await }
    })
    .await;
    match reply {
        Ok(reply) => {
            for change in &plan.changes {
                let verb = match change.action {
                    Action::Create => "created",
                    Action::Update => "updated",
                    Action::Delete => "deleted",
                };
                println!("{} {verb}", change.target);
                for field in &change.fields {
                    println!("    {field}");
                }
            }
            println!(
                "applied {} changes at revision {} (planned at revision {})",
                reply.changed, reply.revision, plan.revision
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if is_conflict(&e) => {
            eprintln!(
                "error: conflict: the configuration changed after the plan was made ({e}); nothing was written: run diff again and review the new plan"
            );
            Ok(ExitCode::from(EXIT_CONFLICT))
        }
        Err(e) => Err(with_source(e, &loaded)),
    }
}

fn is_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ServerError>()
        .is_some_and(|s| s.code == tonic::Code::Aborted)
}

fn op_to_pb(op: &Op) -> pb::Operation {
    pb::Operation {
        op: Some(match op {
            Op::Put {
                object,
                expected_revision,
            } => pb::operation::Op::Put(pb::PutRequest {
                object: Some(pb::Object::from(object)),
                expected_revision: *expected_revision,
            }),
            Op::Delete {
                target,
                expected_revision,
            } => pb::operation::Op::Delete(pb::DeleteRequest {
                target: Some(pb::ObjectRef::from(target)),
                expected_revision: *expected_revision,
            }),
        }),
    }
}
