//! `sqlferry completions SHELL` and `sqlferry man [COMMAND]`: the shell completion
//! script and the manual pages, generated from the same clap definitions as `--help`,
//! so they never drift from the flags.

use std::io::Write as _;
use std::process::ExitCode;

use clap::CommandFactory as _;

use super::{Cli, Global, exit};
use crate::shutdown::Shutdown;

/// Arguments of `sqlferry completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:\n  \
sqlferry completions bash > ~/.local/share/bash-completion/completions/sqlferry\n  \
sqlferry completions zsh > \"${fpath[1]}/_sqlferry\"\n  \
sqlferry completions fish > ~/.config/fish/completions/sqlferry.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

impl CompletionsArgs {
    /// Prints the script on stdout.
    pub async fn run(self, _global: &Global, _shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let mut out = Vec::new();
        clap_complete::generate(self.shell, &mut Cli::command(), "sqlferry", &mut out);
        write_stdout(&out)
    }
}

/// Arguments of `sqlferry man`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:\n  \
sqlferry man | man -l -          read sqlferry(1)\n  \
sqlferry man push | man -l -     read sqlferry-push(1)\n  \
sqlferry man --dir /usr/local/share/man/man1   install every page")]
pub struct ManArgs {
    /// The command whose page to print (push, pull, …); sqlferry(1) when left out.
    pub command: Option<String>,
    /// Write every page (sqlferry.1, sqlferry-push.1, …) into this directory instead.
    #[arg(long, value_name = "DIR", conflicts_with = "command")]
    pub dir: Option<std::path::PathBuf>,
}

impl ManArgs {
    /// Prints one page in roff on stdout, or writes them all into `--dir`.
    pub async fn run(self, global: &Global, _shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let cmd = Cli::command();
        if let Some(dir) = &self.dir {
            std::fs::create_dir_all(dir)
                .and_then(|()| clap_mangen::generate_to(cmd, dir))
                .map_err(|e| crate::Error::io(dir, e))?;
            if !global.quiet {
                super::out(format_args!("manual pages written to {}", dir.display()))?;
            }
            return Ok(ExitCode::from(exit::OK));
        }
        let man = match &self.command {
            None => clap_mangen::Man::new(cmd),
            Some(name) => {
                let mut cmd = cmd;
                cmd.build();
                let found = cmd.find_subcommand(name).cloned().ok_or_else(|| {
                    crate::Error::Usage(format!(
                        "no command {name}: see `sqlferry help` for the list"
                    ))
                })?;
                // Titled as the page is named: sqlferry-push(1).
                let title = format!("sqlferry-{}", found.get_name());
                clap_mangen::Man::new(found).title(title)
            }
        };
        let mut out = Vec::new();
        man.render(&mut out)
            .map_err(|e| crate::Error::io(std::path::Path::new("<stdout>"), e))?;
        write_stdout(&out)
    }
}

/// `bytes` on stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::from(exit::OK)),
    }
}
