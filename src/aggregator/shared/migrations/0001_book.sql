-- The shared book, schema version 1. Applied once per database by the first aggregator
-- that starts (src/aggregator/shared/mod.rs, under an advisory lock), in one transaction.
-- Amounts are integer GPU-milliseconds; a minute is its number since the Unix epoch.

-- The book itself: one row, written by the first aggregator, naming the shard count
-- every aggregator of this book must use.
CREATE TABLE book (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    shards integer NOT NULL CHECK (shards > 0),
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One shard's evidence (ledger::shard::Partial) for one contract and minute. The first
-- write wins; a replica's or a retry's write of the same key changes nothing.
CREATE TABLE contributions (
    contract text NOT NULL,
    minute bigint NOT NULL,
    shard integer NOT NULL CHECK (shard >= 0),
    delivered bigint NOT NULL,
    used bigint NOT NULL,
    reported bigint NOT NULL,
    expected bigint NOT NULL,
    absent bigint NOT NULL,
    held bigint NOT NULL,
    allocated bigint NOT NULL,
    watched boolean NOT NULL,
    unsized_dark boolean NOT NULL,
    capacity_gpus bigint NOT NULL,
    written_by text NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contract, minute, shard)
);

-- A contribution's team time, written only with the contribution that won.
CREATE TABLE contribution_teams (
    contract text NOT NULL,
    minute bigint NOT NULL,
    shard integer NOT NULL,
    team text NOT NULL,
    allocated bigint NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (contract, minute, shard, team),
    FOREIGN KEY (contract, minute, shard) REFERENCES contributions
);

-- Per contract: where sealing resumes, the running all-time sums of its sealed minutes
-- (one column per ledger kind, in Kind::ALL order), and each shard's last contributed
-- capacity (GPUs; index = shard + 1; NULL: none yet), what a minute the shard misses is
-- assumed to hold.
-- Its row is also the contract's lock: contributions take it FOR SHARE, a seal FOR UPDATE.
CREATE TABLE contract_totals (
    contract text PRIMARY KEY,
    seal_from bigint,
    committed bigint NOT NULL DEFAULT 0,
    delivered bigint NOT NULL DEFAULT 0,
    used bigint NOT NULL DEFAULT 0,
    idle bigint NOT NULL DEFAULT 0,
    undelivered bigint NOT NULL DEFAULT 0,
    unreported bigint NOT NULL DEFAULT 0,
    overage bigint NOT NULL DEFAULT 0,
    idle_unallocated bigint NOT NULL DEFAULT 0,
    idle_allocated bigint NOT NULL DEFAULT 0,
    allocated bigint NOT NULL DEFAULT 0,
    shard_capacity bigint[] NOT NULL DEFAULT '{}'
);

-- A contract's sealed minute: the split from all shards' contributions. Sealed once
-- (the primary key), never changed (the trigger below).
CREATE TABLE sealed_minutes (
    contract text NOT NULL,
    minute bigint NOT NULL,
    committed bigint NOT NULL,
    delivered bigint NOT NULL,
    used bigint NOT NULL,
    idle bigint NOT NULL,
    undelivered bigint NOT NULL,
    unreported bigint NOT NULL,
    overage bigint NOT NULL,
    idle_unallocated bigint NOT NULL,
    idle_allocated bigint NOT NULL,
    allocated bigint NOT NULL,
    -- The contract's shortfall against its known capacity; NULL: dark, unknown.
    short bigint,
    sealed_by text NOT NULL,
    sealed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (contract, minute)
);

CREATE TABLE sealed_teams (
    contract text NOT NULL,
    minute bigint NOT NULL,
    team text NOT NULL,
    allocated bigint NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (contract, minute, team),
    FOREIGN KEY (contract, minute) REFERENCES sealed_minutes
);

-- The shards that had not contributed when a minute was sealed (their grace expired), and
-- the capacity (GPUs) each was assumed to hold: counted as unreported. NULL: the shard never
-- contributed for the contract, its capacity is unknown and the minute was sealed dark.
CREATE TABLE sealed_missing_shards (
    contract text NOT NULL,
    minute bigint NOT NULL,
    shard integer NOT NULL,
    capacity_gpus bigint,
    PRIMARY KEY (contract, minute, shard),
    FOREIGN KEY (contract, minute) REFERENCES sealed_minutes
);

-- All-time team time of each contract's sealed minutes, moved in the seal's transaction.
CREATE TABLE team_totals (
    contract text NOT NULL,
    team text NOT NULL,
    allocated bigint NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (contract, team)
);

-- Sealed minutes never change.
CREATE FUNCTION commitmeter_sealed_never_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'commitmeter shared book: % of a sealed minute refused: sealed minutes never change', TG_OP;
END;
$$;
CREATE TRIGGER sealed_minutes_never_change BEFORE UPDATE OR DELETE ON sealed_minutes
    FOR EACH ROW EXECUTE FUNCTION commitmeter_sealed_never_change();
CREATE TRIGGER sealed_teams_never_change BEFORE UPDATE OR DELETE ON sealed_teams
    FOR EACH ROW EXECUTE FUNCTION commitmeter_sealed_never_change();
CREATE TRIGGER sealed_missing_shards_never_change BEFORE UPDATE OR DELETE ON sealed_missing_shards
    FOR EACH ROW EXECUTE FUNCTION commitmeter_sealed_never_change();
