from services.gateway.domain import Registration, registration_outcome

USER = {"user_id": "u-1", "full_name": "A", "birth_date": None, "phone": "1", "id_number": None,
        "real_name_verified": True}


def test_registration_outcomes():
    assert registration_outcome(None, USER) is Registration.CREATED
    assert registration_outcome({**USER, "registered_at": "whenever"}, USER) is Registration.REPEATED
    assert registration_outcome({**USER, "phone": "2"}, USER) is Registration.CONFLICT
