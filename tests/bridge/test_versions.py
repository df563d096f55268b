"""``hello``'s versions, read from dist-info names, agree with importlib.metadata."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from bridge.versions import _dist_infos, package_versions


def test_versions_agree_with_importlib_metadata() -> None:
    versions = package_versions(("mlx", "mlx-lm", "orjson"), optional=("mlx-vlm", "no-such-dist"))
    assert versions["bridge"] == metadata.version("mlx-bridge")
    for name in ("mlx", "mlx-lm", "orjson", "mlx-vlm"):
        assert versions[name] == metadata.version(name)
    assert "no-such-dist" not in versions


def test_a_required_package_that_is_missing_is_unknown() -> None:
    assert package_versions(("no-such-dist",))["no-such-dist"] == "unknown"


def test_the_first_path_entry_wins_and_names_are_normalized(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    (first / "Mlx_LM-1.0.dist-info").mkdir(parents=True)
    (second / "mlx_lm-2.0.dist-info").mkdir(parents=True)
    (second / "not-a-dist").mkdir()
    assert _dist_infos([str(first), str(second), str(tmp_path / "missing")]) == {"mlx_lm": "1.0"}
