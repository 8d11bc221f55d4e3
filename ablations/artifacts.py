"""Where a sweep's MLflow artifacts are: in folder/mlartifacts/, beside its store folder/mlflow.db, wherever the
folder was copied. Used by the sweep when it opens its stores, and by the reports that read a copied sweep."""
from __future__ import annotations

from contextlib import closing
from pathlib import Path


def relocate_artifacts(folder: Path) -> None:
    """Point the MLflow store folder/mlflow.db at folder/mlartifacts/, the artifacts beside it.

    MLflow records artifact locations as absolute file URIs of the machine that ran the sweep; a clone or a
    copy of the folder elsewhere would list the runs without their grids, tables and plots. Every location
    under a folder named mlartifacts is rewritten to this folder's (a no-op where they already agree).
    """
    import sqlite3

    db = folder / "mlflow.db"
    if not db.exists():
        return
    here = (folder / "mlartifacts").resolve().as_uri()
    with closing(sqlite3.connect(db)) as con, con:
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            for rowid, uri in con.execute(f"SELECT rowid, {column} FROM {table}").fetchall():
                if uri and "/mlartifacts" in uri and not uri.startswith(here):
                    rest = uri[uri.index("/mlartifacts") + len("/mlartifacts") :]
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (here + rest, rowid))


def local_store(tracking_uri: str) -> Path | None:
    """The folder of a tracking URI that is a SQLite file named mlflow.db (its artifacts go beside it), else None."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or not tracking_uri.endswith("/mlflow.db"):
        return None
    return Path(tracking_uri[len(prefix) :]).parent
