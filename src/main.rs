//! The `jumpgate` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tune_allocator();
    let cli = jumpgate::cli::Cli::parse();
    jumpgate::cli::main(cli)
}

/// glibc's malloc returns freed memory to the kernel as soon as the top of a
/// heap is free (128 KiB), and russh frees each 32 KiB packet buffer on
/// another worker thread than the one that allocated it: the SSH relay took
/// ~100,000 page faults per GiB (sshd: 7,500) re-faulting the same memory.
/// A 16 MiB trim threshold stops that; setting it also freezes the mmap
/// threshold at 128 KiB, so raise that too (the relay reads 256 KiB chunks).
/// Cost: up to 16 MiB per arena may stay resident after a burst.
/// Measured in docs/bench-ssh.md.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    const TRIM_THRESHOLD: libc::c_int = 16 * 1024 * 1024;
    const MMAP_THRESHOLD: libc::c_int = 4 * 1024 * 1024;
    // SAFETY: mallopt only changes allocator parameters; it is called once,
    // before any other thread exists, with valid parameter numbers.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}
