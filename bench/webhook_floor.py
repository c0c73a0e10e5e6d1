"The floor of the webhook benchmarks: what recording one delivery costs at the least, with nothing else around it."

import json

from sqlalchemy.dialects import postgresql

from fh_saas.db_host import webhook_events_t


def floor_insert(conn, body: str):
    "One INSERT ... ON CONFLICT DO NOTHING of the event in `body` into the inbox, and its commit."
    ev = json.loads(body)
    conn.execute(
        postgresql.insert(webhook_events_t)
        .values(
            event_id=ev["id"],
            event_type=ev["type"],
            status="processed",
            payload_json=body,
            event_created=ev["created"],
        )
        .on_conflict_do_nothing(index_elements=["event_id"])
    )
    conn.commit()
