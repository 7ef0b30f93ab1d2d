-- Rasa's SQLEventBroker table (SQLAlchemy: Integer primary key -> SERIAL, String(255), Text).
CREATE TABLE IF NOT EXISTS {table} (
    id SERIAL NOT NULL,
    sender_id VARCHAR(255),
    data TEXT,
    PRIMARY KEY (id)
)
