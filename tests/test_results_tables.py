"""scripts/results_tables.py: the concealing-row table says which probes each row ran, so a row judged
by partial diffusion alone does not read as exposed by partial diffusion alone."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "leaderboard" / "results" / "shapes" / "heart"


def _seed0(method: str) -> dict:
    for p in sorted((SHIPPED / method).glob("*/record.json")):
        r = json.loads(p.read_text())
        if r.get("seed") == 0:
            return r
    raise AssertionError(f"no seed-0 {method} record shipped for heart")


def _write(folder: Path, method: str, record: dict) -> None:
    (folder / "heart" / method / "k").mkdir(parents=True)
    (folder / "heart" / method / "k" / "record.json").write_text(json.dumps(record))


def test_concealing_rows_name_the_probes_they_ran(tmp_path):
    _write(tmp_path, "retrain", _seed0("retrain"))
    _write(tmp_path, "receler", _seed0("receler"))  # every probe; concealed under relearning only
    esd_u = _seed0("esd_u")
    esd_u["probes"] = {"partial_diffusion": esd_u["probes"]["partial_diffusion"]}  # concealed under partial diffusion
    _write(tmp_path, "esd_u", esd_u)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "results_tables.py"), str(tmp_path), "--concepts", "heart"],
                         capture_output=True, text=True, check=True).stdout
    table = out.split("#### Which probe exposes each concealing row")[1].split("Rows every probe")[0]
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| heart |")}
    assert rows["esd_u"] == "| heart | esd_u | partial diffusion | partial diffusion | partial diffusion |"
    assert rows["receler"] == "| heart | receler | relearning | relearning | all |"
