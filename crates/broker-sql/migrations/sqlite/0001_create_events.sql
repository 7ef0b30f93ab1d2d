-- Rasa's SQLEventBroker table (SQLAlchemy: Integer primary key, String(255), Text).
-- On SQLite an INTEGER primary key is the rowid: ids grow in commit order (one writer at a time).
CREATE TABLE IF NOT EXISTS {table} (
    id INTEGER NOT NULL,
    sender_id VARCHAR(255),
    data TEXT,
    PRIMARY KEY (id)
)
