"""The plain install serves ONNX models without torch: building the app must never import it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_building_and_starting_the_app_does_not_import_torch(store: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from service.app import create_app
        from service.settings import Settings

        app = create_app(Settings(model_store={str(store)!r}, default_model="tiny"))
        registry = app.state.model_registry

        async def main():
            await registry.load_all()
            assert registry.readiness()[0], registry.readiness()
            await registry.stop()

        asyncio.run(main())
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
