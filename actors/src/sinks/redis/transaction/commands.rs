//! A transaction's commands packed into one buffer: their arguments as one
//! [`Args`] (every argument's bytes one after another), and where each command's
//! arguments end. A plan holds its transactions until they commit, and a `redis::Cmd`
//! per command (two heap blocks and its own header each) took several times the bytes
//! of the arguments it carries, past what the memory budget counts for a plan; packed,
//! a transaction holds about what a script's arguments hold. A command becomes a
//! `redis::Cmd` only as it is sent.

use crate::logic::decode::TraceValue;
use crate::protocol::scripts::Args;

/// The commands of one transaction, in order.
#[derive(Debug, Default)]
pub(super) struct Commands {
    args: Args,
    /// End of each command's arguments, as a position in `args`.
    ends: Vec<u32>,
}

impl Commands {
    /// Starts a command named `name`; its arguments follow, and [`Commands::end`]
    /// closes it.
    pub(super) fn start(&mut self, name: &str) -> &mut Self {
        self.arg(name)
    }

    pub(super) fn arg(&mut self, arg: &str) -> &mut Self {
        self.args.push_str(arg);
        self
    }

    pub(super) fn int(&mut self, n: i64) -> &mut Self {
        self.args.push_int(n);
        self
    }

    /// A list value, as JSON.
    pub(super) fn value(&mut self, value: &TraceValue) -> &mut Self {
        self.args.push_value(value);
        self
    }

    /// Closes the command started last.
    pub(super) fn end(&mut self) {
        // A transaction is sized to a fraction of `redis.max_commit_ms` of Redis's
        // work: far fewer than 2^32 arguments.
        self.ends.push(self.args.len() as u32);
    }

    pub(super) fn len(&self) -> usize {
        self.ends.len()
    }

    /// The arguments of command `n`, its name first.
    fn args(&self, n: usize) -> impl Iterator<Item = &str> + '_ {
        let first = match n {
            0 => 0,
            n => self.ends[n - 1] as usize,
        };
        self.args.range(first..self.ends[n] as usize)
    }

    /// The key command `n` writes (its first argument after the name).
    pub(super) fn key(&self, n: usize) -> String {
        self.args(n).nth(1).unwrap_or_default().to_string()
    }

    /// Command `n` as the client sends it.
    pub(super) fn to_cmd(&self, n: usize) -> redis::Cmd {
        let (count, size) = self
            .args(n)
            .fold((0, 0), |(count, size), arg| (count + 1, size + arg.len()));
        let mut command = redis::Cmd::with_capacity(count, size);
        for arg in self.args(n) {
            command.arg(arg);
        }
        command
    }

    /// The heap this holds, in bytes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.args.heap_bytes() + self.ends.capacity() * std::mem::size_of::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(a) => String::from_utf8_lossy(a).into_owned(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn commands_come_back_as_they_were_packed() {
        let mut commands = Commands::default();
        let value = TraceValue {
            state: 10,
            business_id: 9,
            timestamp: 5,
        };
        commands.start("LPUSH").arg("r1").value(&value).arg("");
        commands.end();
        commands.start("PEXPIRE").arg("r1").int(-42);
        commands.end();
        commands.start("TIME");
        commands.end();
        assert_eq!(commands.len(), 3);
        assert_eq!(
            names(&commands.to_cmd(0)),
            ["LPUSH", "r1", &value.to_json(), ""]
        );
        assert_eq!(names(&commands.to_cmd(1)), ["PEXPIRE", "r1", "-42"]);
        assert_eq!(names(&commands.to_cmd(2)), ["TIME"]);
        assert_eq!(commands.key(1), "r1");
        assert_eq!(commands.key(2), "", "a command without a key");
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg("r1").arg(-42);
        assert_eq!(
            commands.to_cmd(1).get_packed_command(),
            cmd.get_packed_command(),
            "the bytes a Cmd built the usual way sends"
        );
    }
}
