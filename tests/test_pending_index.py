"""pending_index(): declared in the class body (``__table_args__``) or after the class, the same index."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import DateTime, Index, MetaData, Table, inspect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.schema import CreateIndex

from batchjobs import BatchJobsError, flag_column, pending_index
from batchjobs.db import create_engine


class InBody(DeclarativeBase):
    metadata = MetaData(naming_convention={"ix": "ix_%(column_0_label)s"})


class AfterClass(DeclarativeBase):
    metadata = MetaData(naming_convention={"ix": "ix_%(column_0_label)s"})


class BodyAccount(InBody):
    __tablename__ = "accounts"

    # The flag comes before the key on purpose: the index is built once the table has both.
    welcomed: Mapped[bool] = flag_column()
    # A DateTime flag whose type comes from the annotation, known only once the class is mapped.
    receipt_sent_at: Mapped[datetime | None] = mapped_column()
    key: Mapped[int] = mapped_column("account_id", primary_key=True)

    __table_args__ = (pending_index(welcomed), pending_index(receipt_sent_at, name="ix_accounts_receipt_pending"))


class LaterAccount(AfterClass):
    __tablename__ = "accounts"

    welcomed: Mapped[bool] = flag_column()
    receipt_sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    key: Mapped[int] = mapped_column("account_id", primary_key=True)


pending_index(LaterAccount.welcomed)
pending_index(LaterAccount.receipt_sent_at, name="ix_accounts_receipt_pending")


def _ddl(table: Table, dialect: object) -> list[str]:
    return sorted(str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes)  # type: ignore[arg-type]


def test_the_class_body_declares_the_same_indexes_as_after_the_class(db_url: str) -> None:
    engine = create_engine(db_url)
    body, later = BodyAccount.__table__, LaterAccount.__table__
    assert isinstance(body, Table) and isinstance(later, Table)
    assert len(body.indexes) == 2
    assert _ddl(body, engine.dialect) == _ddl(later, engine.dialect)
    # And the database builds them: by name, on the key (MySQL/MariaDB: on flag and key).
    InBody.metadata.create_all(engine)
    try:
        built = {index["name"]: index["column_names"] for index in inspect(engine).get_indexes("accounts")}
    finally:
        InBody.metadata.drop_all(engine)
        engine.dispose()
    flagged = engine.dialect.name in ("mysql", "mariadb")
    assert built["ix_accounts_welcomed_pending"] == (["welcomed", "account_id"] if flagged else ["account_id"])
    assert built["ix_accounts_receipt_pending"] == (["receipt_sent_at", "account_id"] if flagged else ["account_id"])


def test_a_flag_of_the_wrong_type_is_refused_in_the_class_body() -> None:
    class Other(DeclarativeBase):
        pass

    with pytest.raises(BatchJobsError, match="must be Boolean"):

        class Wrong(Other):
            __tablename__ = "wrong"
            id: Mapped[int] = mapped_column(primary_key=True)
            name: Mapped[str] = mapped_column()
            __table_args__ = (pending_index(name),)


def test_an_index_object_is_what_table_args_get() -> None:
    assert isinstance(pending_index(flag_column()), Index)
