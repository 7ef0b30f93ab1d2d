//! What one spooled record holds: the event's id, its headers and its bytes.

use broker_core::{Event, EventId, PublishOptions};

/// An event's record: `id: u128 LE`, `headers: u16 LE` count, each `name` (u16 length + bytes)
/// and `value` (u32 length + bytes), then the event's bytes.
#[cfg(test)]
pub(crate) fn encode(event: &Event, options: &PublishOptions) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    encode_into(event, options, &mut out);
    out
}

/// [`encode`] onto the end of `out` (the log's buffer: the record is encoded in place).
pub(crate) fn encode_into(event: &Event, options: &PublishOptions, out: &mut Vec<u8>) {
    out.extend_from_slice(&event.id().as_u128().to_le_bytes());
    let headers = &options.headers[..options.headers.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
    for (name, value) in headers {
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        let value = &value.as_bytes()[..value.len().min(u32::MAX as usize)];
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    event.write_json(out);
}

/// The length of [`encode`]'s record, without encoding it.
pub(crate) fn encoded_len(event: &Event, options: &PublishOptions) -> usize {
    let headers = &options.headers[..options.headers.len().min(u16::MAX as usize)];
    let header_bytes: usize =
        headers.iter().map(|(n, v)| 2 + n.len().min(u16::MAX as usize) + 4 + v.len().min(u32::MAX as usize)).sum();
    16 + 2 + header_bytes + event.json_len()
}

/// The event and options of a record; `None` when it is not one (it is then dropped, said).
pub(crate) fn decode(payload: &[u8]) -> Option<(Event, PublishOptions)> {
    let mut at = 0usize;
    let mut take = |n: usize| {
        let slice = payload.get(at..at + n)?;
        at += n;
        Some(slice)
    };
    let id = u128::from_le_bytes(take(16)?.try_into().ok()?);
    let count = u16::from_le_bytes(take(2)?.try_into().ok()?);
    let mut options = PublishOptions::default();
    for _ in 0..count {
        let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let name = String::from_utf8(take(n)?.to_vec()).ok()?;
        let v = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let value = String::from_utf8(take(v)?.to_vec()).ok()?;
        options = options.header(name, value);
    }
    let event = Event::from_json(payload.get(at..)?).ok()?.with_id(EventId::from_u128(id));
    Some((event, options))
}
