"""Python tools of the appointment-booking example flow: a stand-in clinic calendar."""

import asyncio
import datetime
import itertools

_references = itertools.count(4101)
_booked: set[str] = set()
OPENING_HOURS = {"morning": ["09:00", "10:30"], "afternoon": ["14:00", "15:30"]}


def check_availability(date: str, time_of_day: str = "any") -> dict:
    """Free slots on a weekday; weekends are closed."""
    day = datetime.date.fromisoformat(date)  # a bad date raises, and the caller hears the fallback
    if day.weekday() >= 5:
        return {"available": False, "slots": [], "first_slot": None}
    parts = OPENING_HOURS if time_of_day == "any" else {time_of_day: OPENING_HOURS[time_of_day]}
    slots = [f"{date} {t}" for times in parts.values() for t in times if f"{date} {t}" not in _booked]
    return {"available": bool(slots), "slots": slots, "first_slot": slots[0] if slots else None}


BOOKING_SECONDS = 1.5  # the stand-in booking system is slow, as real ones can be: the flow's filler covers it


async def book_appointment(slot: str, name: str) -> dict:
    """Book a slot if it is still free; async, as a real booking system's client would be."""
    await asyncio.sleep(BOOKING_SECONDS)
    if slot in _booked:
        return {"booked": False, "reference": None, "slot": slot}
    _booked.add(slot)
    return {"booked": True, "reference": f"RD-{next(_references)}", "slot": slot}
