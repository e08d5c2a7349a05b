"""Python tools of the customer-service example flow: a stand-in customer database."""

CUSTOMERS = {
    "10042": {"first_name": "Maria", "customer_id": "c-10042", "phone": "+15551230042"},
    "20817": {"first_name": "James", "customer_id": "c-20817", "phone": "+15551230817"},
}


def find_customer(account_number: str = "", state: dict | None = None) -> dict:
    """By account number, or else by the number the caller is calling from."""
    customer = CUSTOMERS.get(account_number.strip())
    if customer is None and state and state.get("caller_number"):
        customer = next((c for c in CUSTOMERS.values() if c["phone"] == state["caller_number"]), None)
    if customer is None:
        return {"found": False}
    return {"found": True, "first_name": customer["first_name"], "customer_id": customer["customer_id"]}
