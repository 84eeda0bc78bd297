//! The CUDA runtime without a GPU: NVRTC compiles every kernel (argument
//! struct layouts checked against the Rust mirrors at compile time), no kernel spills, the
//! on-disk cache (keys, atomic concurrent writes), the architecture choice, and clear errors
//! where there is no driver. NVRTC is looked for as the library does ($TVC_NVRTC, $CUDA_HOME,
//! ...) plus the repository's .venv (PyTorch's CUDA wheels bring it); tests that need it say so
//! and pass vacuously only when it is absent (the Python tests run the same compile).

use std::path::PathBuf;

use tvc_rs::cuda::{self, cache, driver, nvrtc, KernelFile};

fn configure_nvrtc() -> bool {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = Vec::new();
    for lib in ["lib", "lib64"] {
        if let Ok(pythons) = std::fs::read_dir(root.join(".venv").join(lib)) {
            for python in pythons.flatten() {
                let nvidia = python.path().join("site-packages").join("nvidia");
                if let Ok(entries) = std::fs::read_dir(&nvidia) {
                    dirs.extend(entries.flatten().map(|e| e.path().join("lib")));
                }
            }
        }
    }
    nvrtc::set_search_dirs(dirs);
    match nvrtc::nvrtc() {
        Ok(_) => true,
        Err(why) => {
            eprintln!("skipping: {why}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_without_spills() {
    if !configure_nvrtc() {
        return;
    }
    for file in KernelFile::ALL {
        // sm_90 here; tests/test_cuda.py and `python -m tvc_rs.cuda --check` do sm_80 too.
        for arch in [90] {
            let (cubin, log, ptx) =
                cuda::compile_for_check(file, arch, true).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                cubin.starts_with(b"\x7fELF"),
                "{} sm_{arch}: not an ELF CUBIN",
                file.file_name()
            );
            if let Some(ptx) = ptx {
                let ptx = String::from_utf8_lossy(&ptx).into_owned();
                assert!(ptx.contains(&format!(".target sm_{arch}")), "{ptx:.200}");
            }
            let report = cuda::parse_ptxas_report(&log);
            assert!(
                report.len() >= 10,
                "{} sm_{arch}: {} kernels in the report:\n{log}",
                file.file_name(),
                report.len()
            );
            for k in &report {
                assert!(k.registers > 0 && k.registers <= 255, "{k:?}");
                assert_eq!(
                    (k.spill_store_bytes, k.spill_load_bytes),
                    (0, 0),
                    "{} sm_{arch} spills: {k:?}",
                    file.file_name()
                );
            }
        }
    }
}

#[test]
fn a_layout_mismatch_is_a_compile_error() {
    if !configure_nvrtc() {
        return;
    }
    let nvrtc = nvrtc::nvrtc().unwrap();
    let mut options = tvc_rs::cuda::sources::options(KernelFile::Kv, 80, "sm", &[]);
    for o in options.iter_mut() {
        if o.starts_with("-DTVC_SIZEOF_PagedArgs=") {
            *o = "-DTVC_SIZEOF_PagedArgs=8".into();
        }
    }
    let err = nvrtc
        .compile(
            KernelFile::Kv.source(),
            "kv.cu",
            &[tvc_rs::cuda::sources::HEADER],
            &options,
            true,
        )
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("PagedArgs differs"), "{err}");
}

#[test]
fn ptxas_report_parsing() {
    let log = "ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'pool_f32_v' for 'sm_90'\n\
               ptxas info    : Function properties for pool_f32_v\nptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 1 barriers, 2064 bytes smem, 2176 bytes cmem[0]\n\
               ptxas info    : Compiling entry function 'gather_f16_s' for 'sm_90'\nptxas info    : Used 14 registers, used 0 barriers, 960 bytes cmem[0]\n";
    let r = cuda::parse_ptxas_report(log);
    assert_eq!(r.len(), 2);
    assert_eq!(
        (
            r[0].name.as_str(),
            r[0].registers,
            r[0].shared_bytes,
            r[0].stack_bytes,
            r[0].spill_store_bytes,
            r[0].spill_load_bytes
        ),
        ("pool_f32_v", 40, 2064, 16, 8, 4)
    );
    assert_eq!(
        (r[1].name.as_str(), r[1].registers, r[1].shared_bytes),
        ("gather_f16_s", 14, 0)
    );
}

#[test]
fn architecture_choice() {
    let nvrtc13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
    assert_eq!(driver::pick_arch((9, 0), &nvrtc13).unwrap(), 90);
    assert_eq!(driver::pick_arch((8, 6), &[75, 80, 90]).unwrap(), 80);
    let err = driver::pick_arch((7, 0), &nvrtc13).unwrap_err();
    assert!(err.to_string().contains("compute capability 7.0"), "{err}");
}

#[test]
fn cache_keys_differ_by_source_arch_and_version() {
    let root = PathBuf::from("/cache");
    let a = cache::cubin_path(&root, KernelFile::Kv, 90, (13, 0));
    assert!(
        a.starts_with("/cache/kernels") && a.to_string_lossy().contains("kv-sm90-nvrtc13.0-"),
        "{a:?}"
    );
    assert_ne!(a, cache::cubin_path(&root, KernelFile::Kv, 80, (13, 0)));
    assert_ne!(a, cache::cubin_path(&root, KernelFile::Kv, 90, (13, 1)));
    assert_ne!(
        a,
        cache::cubin_path(&root, KernelFile::Compress, 90, (13, 0))
    );
    assert_eq!(a, cache::cubin_path(&root, KernelFile::Kv, 90, (13, 0)));
}

#[test]
fn cache_writes_are_atomic_under_concurrency() {
    let dir = std::env::temp_dir().join(format!("tvc-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("kernels").join("x.cubin");
    let payloads: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 1 << 20]).collect();
    std::thread::scope(|s| {
        for p in &payloads {
            let path = path.clone();
            s.spawn(move || {
                for _ in 0..5 {
                    cache::store(&path, p).unwrap();
                    // Whatever a reader sees is one writer's whole file (its digest checks).
                    let seen = cache::load(&path).expect("a whole, verified file");
                    assert_eq!(seen.len(), 1 << 20);
                    assert!(seen.iter().all(|&b| b == seen[0]));
                }
            });
        }
    });
    let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("x.cubin")],
        "temporary files left behind"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    if driver::driver_version().is_ok() {
        eprintln!("a CUDA driver is present: nothing to check here");
        return;
    }
    let err = cuda::device(0).err().expect("no driver");
    assert!(err.to_string().contains("no CUDA driver"), "{err}");
    assert_eq!(cuda::device_count(), 0);
    let info = cuda::runtime_info();
    assert!(info.driver_error.is_some() && info.driver_version.is_none());
}

#[test]
fn cache_files_carry_and_check_a_digest_of_their_contents() {
    let cubin = b"\x7fELF not really a cubin".to_vec();
    let stored = cache::encode(&cubin);
    assert_eq!(cache::decode(&stored), Some(&cubin[..]));
    let mut edited = stored.clone();
    *edited.last_mut().unwrap() ^= 1;
    assert_eq!(cache::decode(&edited), None);
    assert_eq!(cache::decode(&cubin), None); // a bare CUBIN (no digest) is not trusted
    assert_eq!(cache::decode(&stored[..stored.len() - 1]), None); // truncated
}

#[cfg(unix)]
#[test]
fn cache_store_and_load_refuse_tampered_files_and_symlinks() {
    use std::os::unix::fs::PermissionsExt;

    let root = std::env::temp_dir().join(format!("tvc-cache-trust-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let path = root.join("kernels").join("kv-sm90-test.cubin");
    cache::store(&path, b"cubin bytes").unwrap();
    for dir in [&root, &root.join("kernels")] {
        let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{dir:?}");
    }
    assert_eq!(cache::load(&path).as_deref(), Some(&b"cubin bytes"[..]));
    // Edited contents: the digest no longer matches.
    let mut data = std::fs::read(&path).unwrap();
    *data.last_mut().unwrap() = b'X';
    std::fs::write(&path, &data).unwrap();
    assert_eq!(cache::load(&path), None);
    // A symbolic link to a valid cache file is not followed.
    let real = root.join("kernels").join("real.cubin");
    cache::store(&real, b"cubin bytes").unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&real, &path).unwrap();
    assert_eq!(cache::load(&path), None);
    assert!(cache::load(&real).is_some());
    // A file others may write is not trusted.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(cache::load(&real), None);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn nvrtc_candidates_are_absolute_paths_or_sonames() {
    // Whatever the search directories are, nothing relative to the current directory is tried
    // (bare sonames go to the system loader).
    for (path, _) in nvrtc::candidates() {
        assert!(
            path.is_absolute() || !path.to_string_lossy().contains('/'),
            "relative candidate {path:?}"
        );
    }
}

/// The operations of `tvc_rs::compress` on CUDA views (device memory from `DriverAlloc`) give
/// what they give on CPU views of the same data. Skips (saying why) without a GPU.
#[test]
fn compress_operations_on_cuda_views_match_the_cpu_path() {
    use tvc_rs::compress::{self as ops, Budget, DeviceAlloc, HostOnly, KeepFrom, Output, Rule};
    use tvc_rs::cuda::alloc::DriverAlloc;
    use tvc_rs::tensor::{OwnedTensor, TensorView};

    if !configure_nvrtc() {
        return;
    }
    let alloc = match DriverAlloc::new(0, cuda::Stream(0)) {
        Ok(alloc) => alloc,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let host = |out: Output<std::convert::Infallible>| {
        let Output::Host(out) = out;
        out
    };
    let back = |out: Output<_>| -> OwnedTensor {
        let Output::Device(tensor) = out else {
            panic!("a CUDA input gave a host result")
        };
        let tensor: tvc_rs::cuda::alloc::DeviceTensor = tensor;
        tensor.to_host(alloc.stream()).unwrap()
    };
    let close = |got: &OwnedTensor, want: &OwnedTensor, what: &str| {
        assert_eq!(got.shape(), want.shape(), "{what}");
        let (g, w) = (
            got.as_slice::<f32>().unwrap(),
            want.as_slice::<f32>().unwrap(),
        );
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    };
    let (tokens, dim) = (2 * 6 * 5 + 3 * 4, 40);
    let grid_thw = [[2i64, 6, 5], [1, 3, 4]];
    let x: Vec<f32> = (0..tokens * dim)
        .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
        .collect();
    let x_cpu = TensorView::from_slice("x", &x, &[tokens, dim]).unwrap();
    let x_dev = alloc.upload(&x, &[tokens, dim]).unwrap();
    let x_gpu = x_dev.view("x");

    let (pooled_cpu, grids_cpu) =
        ops::pool_visual_tokens(&x_cpu, &grid_thw, (2, 3), &HostOnly).unwrap();
    let (pooled_gpu, grids_gpu) =
        ops::pool_visual_tokens(&x_gpu, &grid_thw, (2, 3), &alloc).unwrap();
    assert_eq!(grids_cpu, grids_gpu);
    close(&back(pooled_gpu), &host(pooled_cpu), "pool");

    // x as the keys of 4 kv heads of dim 10, its first 3 rows as queries of 8 heads (GQA).
    let keys_cpu = TensorView::from_slice("keys", &x, &[tokens, 4, 10]).unwrap();
    let query_cpu = TensorView::from_slice("query", &x[..3 * dim], &[3, 8, 5]).unwrap();
    let keys_dev = alloc.upload(&x, &[tokens, 4, 10]).unwrap();
    let query_dev = alloc.upload(&x[..3 * dim], &[3, 8, 5]).unwrap();
    let err = ops::visual_token_scores(&query_cpu, &keys_cpu, None, None, &HostOnly).unwrap_err();
    assert!(
        err.to_string().contains("keys: head_dim 10 differs"),
        "{err}"
    );
    let query_cpu = TensorView::from_slice("query", &x[..3 * 80], &[3, 8, 10]).unwrap();
    let query_dev2 = alloc.upload(&x[..3 * 80], &[3, 8, 10]).unwrap();
    drop(query_dev);
    let scores_cpu =
        host(ops::visual_token_scores(&query_cpu, &keys_cpu, None, None, &HostOnly).unwrap());
    let scores_gpu = back(
        ops::visual_token_scores(
            &query_dev2.view("query"),
            &keys_dev.view("keys"),
            None,
            None,
            &alloc,
        )
        .unwrap(),
    );
    close(&scores_gpu, &scores_cpu, "scores");

    let scores = scores_cpu.as_slice::<f32>().unwrap().to_vec();
    let scores_dev = alloc.upload(&scores, &[tokens]).unwrap();
    let scores_view = TensorView::from_slice("scores", &scores, &[tokens]).unwrap();
    for rule in [Rule::Keep(17), Rule::Ratio(0.3), Rule::Mass(0.6)] {
        let budget = Budget::new(rule, 2, Some(40)).unwrap();
        let want = host(ops::select_tokens(&scores_view, budget, &HostOnly).unwrap());
        let got = back(ops::select_tokens(&scores_dev.view("scores"), budget, &alloc).unwrap());
        assert_eq!(got, want, "select {rule:?}");
        for merge in [false, true] {
            for (source, scores) in [
                ("device scores", scores_dev.view("scores")),
                ("host scores", scores_view.reborrow()),
            ] {
                let cpu = ops::prune_visual_tokens(
                    &x_cpu,
                    KeepFrom::Scores((&scores_view, budget)),
                    Some(&grid_thw),
                    merge,
                    &HostOnly,
                )
                .unwrap();
                let gpu = ops::prune_visual_tokens(
                    &x_gpu,
                    KeepFrom::Scores((&scores, budget)),
                    Some(&grid_thw),
                    merge,
                    &alloc,
                )
                .unwrap();
                let what = format!("prune {rule:?} merge={merge} {source}");
                assert_eq!(back(gpu.indices), host(cpu.indices), "{what}");
                assert_eq!(back(gpu.cells.unwrap()), host(cpu.cells.unwrap()), "{what}");
                close(&back(gpu.tokens), &host(cpu.tokens), &what);
            }
        }
    }
    let indices: Vec<i64> = (0..tokens as i64).step_by(3).collect();
    let cpu = ops::prune_visual_tokens(&x_cpu, KeepFrom::Indices(&indices), None, false, &HostOnly)
        .unwrap();
    let gpu =
        ops::prune_visual_tokens(&x_gpu, KeepFrom::Indices(&indices), None, false, &alloc).unwrap();
    close(&back(gpu.tokens), &host(cpu.tokens), "prune by indices");
    let err = ops::prune_visual_tokens(&x_gpu, KeepFrom::Indices(&[3, 3]), None, false, &alloc)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("indices[1] = 3 repeats indices[0]"),
        "{err}"
    );
}
