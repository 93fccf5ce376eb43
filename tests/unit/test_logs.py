"""Rank-aware logging: rank 0 by default, warnings from every rank, all ranks on demand."""

import logging

from seerlike.logs import RankFilter


def _record(level):
    return logging.LogRecord("seerlike.x", level, __file__, 1, "msg", None, None)


def test_rank_zero_logs_everything_other_ranks_only_warnings():
    assert RankFilter(0).filter(_record(logging.INFO))
    assert not RankFilter(1).filter(_record(logging.INFO))
    assert RankFilter(1).filter(_record(logging.WARNING))
    assert RankFilter(3, all_ranks=True).filter(_record(logging.DEBUG))


def test_records_carry_their_rank():
    rec = _record(logging.ERROR)
    RankFilter(5).filter(rec)
    assert rec.rank == 5
