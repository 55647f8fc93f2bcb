"""The llama-server peer's build flags, command line and report lines, without building llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench import llama_server, serving
from bench.llama_server import AVX2_ON, AVX512_OFF, BuildFailed
from bench.stats import Summary


def test_avx2_variant_turns_every_avx512_option_off_and_avx2_on() -> None:
    flags = llama_server.cmake_flags("avx2")
    assert flags["GGML_NATIVE"] == "OFF"
    assert all(flags[name] == "OFF" for name in AVX512_OFF)
    assert all(flags[name] == "ON" for name in AVX2_ON)
    assert not [k for k, v in flags.items() if "AVX512" in k and v != "OFF"]


def test_native_variant_is_march_native_and_both_skip_tests_ui_and_https() -> None:
    assert llama_server.cmake_flags("native")["GGML_NATIVE"] == "ON"
    for variant in llama_server.VARIANTS:
        flags = llama_server.cmake_flags(variant)
        assert flags["CMAKE_BUILD_TYPE"] == "Release"
        assert flags["LLAMA_BUILD_TESTS"] == flags["LLAMA_BUILD_EXAMPLES"] == "OFF"
        assert flags["LLAMA_USE_PREBUILT_UI"] == flags["LLAMA_OPENSSL"] == "OFF"
    with pytest.raises(ValueError, match="unknown"):
        llama_server.cmake_flags("avx512")


def test_each_variant_builds_in_its_own_folder() -> None:
    native, avx2 = (llama_server.build_key(v) for v in ("native", "avx2"))
    assert native != avx2
    assert native.startswith(f"build-{llama_server.LLAMA_CPP_PYTHON_VERSION}-native-")
    assert llama_server.build_key("avx2") == avx2  # stable: the cache is found again


def test_native_key_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = []
    for flags in ("fpu avx2", "fpu avx2 avx512f"):
        monkeypatch.setattr(llama_server, "cpu_flags", lambda flags=flags: f"flags : {flags}")
        keys.append((llama_server.build_key("native"), llama_server.build_key("avx2")))
    assert keys[0][0] != keys[1][0]  # a -march=native binary is rebuilt on another CPU
    assert keys[0][1] == keys[1][1]


def test_configure_and_build_commands(tmp_path: Path) -> None:
    configure = llama_server.configure_command("cmake", tmp_path / "src", tmp_path / "b", "avx2")
    assert configure[:5] == ["cmake", "-S", str(tmp_path / "src"), "-B", str(tmp_path / "b")]
    assert "-DGGML_AVX512=OFF" in configure and "-DGGML_AVX2=ON" in configure
    built = llama_server.build_command("cmake", tmp_path / "b", jobs=3)
    assert built == ["cmake", "--build", str(tmp_path / "b"), "--target", "llama-server", "--parallel", "3"]


def test_a_finished_build_is_reused_without_cmake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = llama_server.binary_path("avx2", tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("")
    (binary.parent.parent / "BUILT").write_text("")

    def no_cmake() -> str:
        raise AssertionError("cmake must not run for a cached build")

    monkeypatch.setattr(llama_server, "find_cmake", no_cmake)
    assert llama_server.build("avx2", tmp_path) == binary


def test_missing_cmake_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_server.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(BuildFailed, match="pip install cmake"):
        llama_server.find_cmake()
    with pytest.raises(BuildFailed, match="g\\+\\+"):
        llama_server.check_compiler()


def test_server_command_sizes_the_context_for_every_slot() -> None:
    per_slot = llama_server.context_per_slot(longest_prompt=530, longest_output=256)
    assert per_slot == 1024 and per_slot >= 530 + 256
    command = llama_server.server_command(
        "/x/llama-server", "m.gguf", 8081, 32, per_slot, threads=2, alias="M"
    )
    assert command[0] == "/x/llama-server"

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert (value("-m"), value("--port"), value("-np"), value("-c")) == (
        "m.gguf",
        "8081",
        "32",
        str(32 * 1024),
    )
    assert value("-t") == value("-tb") == "2" and value("-a") == "M"


def test_variants_flag() -> None:
    assert llama_server.parse_variants("none") == ()
    assert llama_server.parse_variants("native,avx2,native") == ("native", "avx2")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown"):
        llama_server.parse_variants("avx512")
    assert serving.parse_args(["--llama-server", "avx2"]).llama_server == ("avx2",)
    assert serving.parse_args([]).llama_server == ()


def _summary(name: str, tok_s: float, tokens: int) -> Summary:
    return Summary(
        name=name, requests=4, output_tokens=tokens, prompt_tokens=100, cached_tokens=0, elapsed=1.0,
        output_tok_s=tok_s, tpot_mean=0.05, ttft_p50=0.2, ttft_p99=0.4, itl_p50=0.05, itl_p99=0.1,
    )  # fmt: skip


def test_report_gives_ratios_against_each_peer_and_flags_unequal_outputs() -> None:
    args = serving.parse_args(["--llama-server", "native,avx2", "--concurrency", "4"])
    result = serving.ServingResult(
        concurrency=4,
        summaries=[
            _summary(serving.OURS, 200.0, 400),
            _summary(serving.llama_name(serving.OURS, "native"), 400.0, 400),
            _summary(serving.llama_name(serving.OURS, "avx2"), 100.0, 390),
        ],
        requested_tokens=400,
        llama_commands=["native: `llama-server -m m.gguf`"],
    )
    text = serving.render(args, result)
    assert "sansllm / llama-server native: output tok/s 200.0 / 400.0 = x0.50" in text
    assert "sansllm / llama-server avx2: output tok/s 200.0 / 100.0 = x2.00" in text
    assert "WARNING: llama-server avx2 returned 390 output tokens, 400 were asked for" in text
    assert "WARNING: llama-server native" not in text
    assert "`llama-server -m m.gguf`" in text
    assert serving.llama_name(serving.OURS_WARM, "avx2") == "llama-server avx2, prefix cached"
